"""Data: data-set readers, vocabulary and safe image decoding."""
