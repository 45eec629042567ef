"""Exceptions raised by lungmets."""

__all__ = ["Cancelled", "InputError"]


class InputError(ValueError):
    """Bad user input: a file, table or option that lungmets cannot use.

    Raised where the input is first read. The message names the file (or option), the problem
    and the fix, e.g. ``"slide.ome.tif: no channel named HER2 (found: DAPI, CY5); pass
    --channels"``, so that the command line can print it without a traceback.
    """


class Cancelled(Exception):
    """The user cancelled a running analysis (napari's Cancel, Ctrl-C, closing the generator).

    Chunks not yet started are not started; nothing of the cancelled slide is written.
    """
