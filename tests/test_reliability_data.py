"""Reliability, round 2 (issue 15): data files that do not decode, data longer than the model's context, and run or
cache folders that cannot be written: each is one ``prefopt: error:`` line naming the file or option, exit 2, no
traceback, nothing changed in the cache or the run folder (the CLI in this process, as in test_reliability2).

Tests run as root, for whom file modes do not stop a read or a write: an unreadable file is an ``open`` that raises
PermissionError (patched), a folder that cannot be written is one under a regular file or inside ``/proc``.
The diffusion pair tables are checked through their loader and an ``ImagePairs`` DataLoader with worker processes.
"""

from __future__ import annotations

import builtins
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from prefopt import runlock
from prefopt.errors import PrefoptError
from test_reliability2 import assert_one_error, cli, snapshot

VOCAB, CONTEXT = 40, 32
GOOD = {"prompt_ids": [3, 4], "chosen_ids": [7, 7], "rejected_ids": [5]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread (tests/conftest.py)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    """A GPT-2 of 32 positions and 40 tokens, saved as a local model folder (safetensors)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=CONTEXT, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    folder = tmp_path_factory.mktemp("lm") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(str(folder))
    return folder


def _jsonl(*rows, name: str = "p.jsonl") -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return write


def _parquet(columns: dict, name: str = "p.parquet") -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), str(tmp / name))
    return write


def _latin1_past_64k(tmp: Path) -> None:
    good = (json.dumps(GOOD) + "\n").encode()
    (tmp / "p.jsonl").write_bytes(good * (70_000 // len(good)) + b'{"prompt_ids": [3], "note": "caf\xe9"}\n')


def _damaged_parquet(tmp: Path) -> None:
    _parquet({"prompt_ids": [[3]] * 4, "chosen_ids": [[7]] * 4, "rejected_ids": [[5]] * 4})(tmp)
    data = bytearray((tmp / "p.parquet").read_bytes())
    data[8:-12] = b"\x00" * (len(data) - 20)  # magic bytes kept, the pages and the footer's metadata zeroed
    (tmp / "p.parquet").write_bytes(bytes(data))


def _dangling(tmp: Path) -> None:
    (tmp / "p.jsonl").symlink_to(tmp / "gone.jsonl")


def _refuse_open(monkeypatch, tmp: Path) -> None:
    """``open`` of the pairs file raises PermissionError, as for a user who may not read it."""
    original = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file) == str(tmp / "p.jsonl"):
            raise PermissionError(13, "Permission denied", str(file))
        return original(file, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", guarded)


@dataclass(frozen=True)
class DataCase:
    """A CLI run over bad data or folders: exit 2, one line holding ``names``. ``overrides`` and ``names`` are
    formatted with ``{tmp}``; ``cache``/``run`` (formatted too) replace the test's cache and run folders."""

    id: str
    overrides: tuple[str, ...]
    names: tuple[str, ...]
    files: Callable[[Path], None] = field(default=lambda tmp: None)
    patch: Callable | None = None
    cache: str | None = None
    run: str | None = None

    def __str__(self) -> str:
        return self.id


SEQ = ("experiment=sequence_local_lm", "domain.task.pairs_path={tmp}/p.jsonl", "domain.task.model_path={model}")
SEQ_PARQUET = ("experiment=sequence_local_lm", "domain.task.pairs_path={tmp}/p.parquet",
               "domain.task.model_path={model}")
LONG = {"prompt_ids": [3] * 20, "chosen_ids": [7] * 21, "rejected_ids": [5] * 4}  # 41 tokens


def _regular_file(tmp: Path) -> None:
    (tmp / "file").write_text("a file, not a folder\n")


DATA_CASES = [
    DataCase("JSONL column of the wrong type (a string of ids)", SEQ, ("p.jsonl row 2", "prompt_ids is str",
                                                                       "a list of token ids"),
             _jsonl(GOOD, {**GOOD, "prompt_ids": "3 4"})),
    DataCase("JSONL token id a fraction", SEQ, ("p.jsonl row 1", "chosen_ids holds 1.5", "integers >= 0"),
             _jsonl({**GOOD, "chosen_ids": [7, 1.5]})),
    DataCase("JSONL token outside the vocabulary", SEQ, ("p.jsonl row 1", "token 45", "vocabulary (size 40)"),
             _jsonl({**GOOD, "chosen_ids": [45]})),
    DataCase("JSONL line that is an array", SEQ, ("p.jsonl:2", "found list", "a JSON object"),
             _jsonl(GOOD, [3, 4, 5])),
    DataCase("JSONL line that is not JSON", SEQ, ("p.jsonl:2", "not a JSON object"), _jsonl(GOOD, "{prompt_ids: [3]")),
    DataCase("JSONL row without rejected_ids", SEQ, ("p.jsonl row 1", "missing columns ['rejected_ids']"),
             _jsonl({"prompt_ids": [3], "chosen_ids": [7]})),
    DataCase("JSONL tie that is not a boolean", SEQ, ("p.jsonl row 1", "tie='maybe'", "true/false"),
             _jsonl({**GOOD, "tie": "maybe"})),
    DataCase("JSONL with no rows", SEQ, ("p.jsonl", "has no rows"), _jsonl("")),
    DataCase("JSONL not UTF-8 past the first 64 KiB", SEQ, ("p.jsonl", "is not UTF-8 text", "near line"),
             _latin1_past_64k),
    DataCase("parquet column of the wrong type (strings)", SEQ_PARQUET, ("p.parquet row 1", "prompt_ids is str"),
             _parquet({"prompt_ids": ["3 4"], "chosen_ids": [[7]], "rejected_ids": [[5]]})),
    DataCase("parquet token ids as doubles", SEQ_PARQUET, ("p.parquet row 1", "chosen_ids holds 7.5"),
             _parquet({"prompt_ids": [[3]], "chosen_ids": [[7.5]], "rejected_ids": [[5]]})),
    DataCase("parquet without chosen_ids", SEQ_PARQUET, ("p.parquet row 1", "missing columns ['chosen_ids']"),
             _parquet({"prompt_ids": [[3]], "rejected_ids": [[5]]})),
    DataCase("parquet with a damaged body", SEQ_PARQUET, ("p.parquet", "not a readable parquet file"),
             _damaged_parquet),
    DataCase("pairs longer than the model's context", (*SEQ, "domain.task.max_length=null"),
             ("domain.task.pairs_path=", "p.jsonl", "row 2 is 41 tokens long", "context of 32 positions",
              "max_length=32"), _jsonl(GOOD, LONG)),
    DataCase("held-out pairs longer than the context", (*SEQ, "domain.task.val_path={tmp}/v.jsonl"),
             ("domain.task.val_path=", "v.jsonl", "41 tokens long"),
             lambda tmp: (_jsonl(GOOD)(tmp), _jsonl(LONG, name="v.jsonl")(tmp))),
    DataCase("pairs file a dangling symlink", SEQ, ("domain.task.pairs_path=", "p.jsonl", "no such file"), _dangling),
    DataCase("pairs file unreadable (PermissionError)", SEQ, ("domain.task.pairs_path=", "p.jsonl", "cannot be read",
                                                              "Permission denied"), _jsonl(GOOD), _refuse_open),
    DataCase("pairs folder that is not a datasets folder", (*SEQ[:1], "domain.task.pairs_path={tmp}/folder",
                                                             SEQ[2]),
             ("folder", "cannot be read as a datasets folder"), lambda tmp: (tmp / "folder").mkdir()),
    # folders that cannot be written (any domain: the bandit's)
    DataCase("cache folder under a regular file", (), ("paths.cache_dir=", "file/cache", "cannot be written",
                                                       "Not a directory"), _regular_file, cache="{tmp}/file/cache"),
    DataCase("cache folder inside /proc", (), ("paths.cache_dir=/proc/prefopt-cache", "cannot be written"),
             cache="/proc/prefopt-cache"),
    DataCase("run folder under a regular file", (), ("run folder", "file/run", "cannot be written"), _regular_file,
             run="{tmp}/file/run"),
    DataCase("run folder inside /proc", (), ("run folder /proc/prefopt-run", "cannot be written"),
             run="/proc/prefopt-run"),
    DataCase("resume_allow of something that cannot change", ("resume_allow=[network]",),
             ("resume_allow=['network']", "allowed: a list of loss")),
]


@pytest.mark.parametrize("case", DATA_CASES, ids=str)
def test_bad_data_and_folders_stop_with_one_line(case, tiny_lm, tmp_path, capsys, monkeypatch):
    import lightning as L

    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    case.files(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    cache = Path(case.cache.format(tmp=tmp_path)) if case.cache else tmp_path / "cache"
    run = Path(case.run.format(tmp=tmp_path)) if case.run else tmp_path / "run"
    if not case.cache:
        cache.mkdir()
        (cache / "entry.bin").write_bytes(b"a cached entry")
    before = snapshot(cache) if cache.is_dir() and not case.cache else {}
    overrides = [o.format(tmp=tmp_path, model=tiny_lm) for o in case.overrides]
    code, _, err = cli(capsys, run, cache, *overrides)
    assert_one_error(code, err, [n.format(tmp=tmp_path) for n in case.names])
    if not case.cache:
        assert snapshot(cache) == before
    if run.is_dir():
        left = {p.name for p in run.iterdir()} - {".hydra", "cli.log", runlock.LOCK_NAME}
        assert not left, left
    assert not runlock._held


def test_the_tables_hold_at_least_sixty_distinct_bad_inputs():
    from test_reliability2 import BAD_DATA, BAD_RUNS, BAD_WEIGHTS, RESUME_MISMATCH

    ids = [c.id for c in BAD_RUNS + BAD_WEIGHTS + BAD_DATA + DATA_CASES] + [",".join(o) for o, _ in RESUME_MISMATCH]
    assert len(set(ids)) == len(ids) >= 60


# ------------------------------------------------------------------------------ diffusion pair tables
def _png(size: tuple[int, int] = (16, 16)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


def _pickapic(tmp: Path, first, name: str = "pairs.parquet") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp / name
    pq.write_table(pa.table({"jpg_0": [first, first], "jpg_1": [_png(), _png()], "label_0": [1.0, 0.0],
                             "caption": ["a", "b"]}), str(path))
    return path


def _one_line(err: BaseException, *names: str) -> None:
    message = str(err)
    assert "\n" not in message and "Traceback" not in message, message
    for name in names:
        assert name in message, (name, message)


def test_an_image_column_of_the_wrong_type_is_named(tmp_path):
    from prefopt.tasks.diffusion.data import load_preference_images

    path = _pickapic(tmp_path, 12345)
    with pytest.raises(PrefoptError) as info:
        load_preference_images(path)
    _one_line(info.value, "pairs.parquet row 0 jpg_0", "is int", "encoded image bytes")


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    from prefopt.tasks.diffusion.data import ImagePairs, load_preference_images

    (tmp_path / "big.png").write_bytes(_png((64, 64)))  # 4096 pixels: a "bomb" under a limit of 1000
    (tmp_path / "small.png").write_bytes(_png())
    (tmp_path / "pairs.csv").write_text("chosen,rejected\nbig.png,small.png\n")
    records = load_preference_images(tmp_path)
    for limit in (1000, 3000):  # over twice the limit PIL raises; between once and twice it warns: both refused
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(PrefoptError) as info:
            ImagePairs(records, 8)[0]
        _one_line(info.value, "pairs.csv row 2", "big.png", "too large to decode safely", f"MAX_IMAGE_PIXELS={limit}")


def test_an_image_error_in_a_dataloader_worker_is_one_line(tmp_path):
    from torch.utils.data import DataLoader

    from prefopt.tasks.diffusion.data import ImagePairs, load_preference_images

    records = load_preference_images(_pickapic(tmp_path, b"not an image at all"))
    loader = DataLoader(ImagePairs(records, 8), batch_size=1, num_workers=2)
    with pytest.raises(PrefoptError) as info:
        list(loader)
    _one_line(info.value, "pairs.parquet row 0", "not a readable image", "(in DataLoader worker process")


def test_a_pairs_table_that_is_not_utf8_is_named(tmp_path):
    from prefopt.tasks.diffusion.data import load_preference_images

    (tmp_path / "pairs.csv").write_bytes(b"chosen,rejected,caption\na.png,b.png,caf\xe9\n")
    with pytest.raises(PrefoptError) as info:
        load_preference_images(tmp_path)
    _one_line(info.value, "pairs.csv", "is not UTF-8 text")


def test_a_decompression_bomb_in_the_diffusion_pairs_stops_the_cli_with_one_line(tmp_path, capsys, monkeypatch):
    """The CLI on a tiny Stable Diffusion pipeline: the bomb is found while the images are encoded, before training."""
    pytest.importorskip("diffusers")
    import lightning as L
    from PIL import Image

    from tiny_pipelines import save_tiny

    pipe = save_tiny("sd", tmp_path / "models")
    _pickapic(tmp_path, _png((16, 16)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # every 16 x 16 image is a "bomb" under this limit
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    code, _, err = cli(capsys, tmp_path / "run", tmp_path / "cache", "experiment=diffusion_pickapic",
                       f"domain.task.pretrained={pipe}", f"domain.task.data={tmp_path / 'pairs.parquet'}",
                       "domain.task.resolution=32", "domain.task.max_sequence_length=8")
    assert_one_error(code, err, ("pairs.parquet row", "too large to decode safely", "MAX_IMAGE_PIXELS=100"))
    assert not list((tmp_path / "cache").rglob("*.safetensors")), "a cache entry was written"
