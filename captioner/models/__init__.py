"""Models: the CNN encoder, the LSTM decoder and the captioner that joins them."""
