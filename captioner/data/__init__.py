"""Data: the synthetic shapes world, data-set readers, vocabulary and safe image decoding."""
