"""Reading a Hugging Face ``datasets`` folder (written by ``save_to_disk``): one helper for every domain."""

from __future__ import annotations

from pathlib import Path

from prefopt.errors import PrefoptError


def load_dataset_folder(path: str | Path, split: str | None = None):
    """The ``datasets.Dataset`` stored in ``path``.

    A folder holding a ``DatasetDict`` needs ``split`` to name one of its splits (``None`` picks the only
    one, and is an error when there are several); a folder holding a single ``Dataset`` has no splits and
    is returned as it is. A folder that ``datasets`` cannot read is a :class:`PrefoptError` naming it.
    """
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise PrefoptError(f"{path}: a folder of preference data needs the `datasets` package") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # a missing, foreign or damaged folder raises several types
        raise PrefoptError(f"{path}: cannot be read as a datasets folder written by save_to_disk "
                           f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no details'})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise PrefoptError(f"{path}: split={split!r} not found; allowed: {', '.join(splits)}")
        loaded = loaded[split]
    return loaded
