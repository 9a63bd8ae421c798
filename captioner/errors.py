"""The one exception type whose message is shown to users as-is."""


class CaptionerError(Exception):
    """A problem the user can fix (bad input, missing file, ...), reported in one line.

    The command line prints ``captioner: error: <message>`` and exits non-zero; the
    service maps it to a JSON error. Messages never carry a traceback.
    """
