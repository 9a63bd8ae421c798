"""captioner: image captioning with a frozen pretrained CNN and an LSTM decoder on frozen word2vec embeddings.

    >>> from captioner import Captioner
    >>> model = Captioner.load("runs/shapes/model.pt")
    >>> model.caption(["photo.jpg"], mode="beam", beam_size=5, num_captions=3)
"""

__version__ = "0.1.0"
__all__ = ["Captioner", "CaptionerError", "__version__"]


def __getattr__(name):
    # Lazy, so `import captioner` (and the command line's start-up) does not import torch.
    if name == "Captioner":
        from captioner.models.captioner import Captioner

        return Captioner
    if name == "CaptionerError":
        from captioner.errors import CaptionerError

        return CaptionerError
    raise AttributeError(name)
