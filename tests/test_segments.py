"""Offline segment pairs: file layouts, padding, teacher labelling and input validation."""

import json

import datasets
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from prefopt.tasks.control.segments import SegmentPairs, collate, load_segment_pairs, pair_segments, save_segment_pairs
from prefopt.data.teachers import ScriptedTeacher
from prefopt.errors import PrefoptError

N, H, OBS, ACT = 6, 4, 3, 2


def _paired(rng, discrete=False):
    cols = {
        "chosen_obs": rng.normal(size=(N, H, OBS)).astype(np.float32),
        "rejected_obs": rng.normal(size=(N, H, OBS)).astype(np.float32),
    }
    if discrete:
        cols["chosen_actions"] = rng.integers(0, 5, size=(N, H))
        cols["rejected_actions"] = rng.integers(0, 5, size=(N, H))
    else:
        cols["chosen_actions"] = rng.normal(size=(N, H, ACT)).astype(np.float32)
        cols["rejected_actions"] = rng.normal(size=(N, H, ACT)).astype(np.float32)
    return cols


def _write_dataset(path, cols):
    datasets.Dataset.from_dict({k: [np.asarray(r).tolist() for r in v] for k, v in cols.items()}).save_to_disk(str(path))
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_npz_paired_roundtrip_and_items(tmp_path, rng):
    cols = _paired(rng)
    cols["tie"] = np.array([0, 1, 0, 0, 0, 0], dtype=bool)
    path = tmp_path / "pairs.npz"
    np.savez(path, **cols)
    ds = load_segment_pairs(path)
    assert len(ds) == N and (ds.horizon, ds.obs_dim, ds.act_dim, ds.discrete) == (H, OBS, ACT, False)
    item = ds[2]
    assert set(item) == {
        "chosen_obs", "chosen_actions", "chosen_mask", "rejected_obs", "rejected_actions", "rejected_mask", "tie", "index",
    }
    assert item["chosen_obs"].shape == (H, OBS) and item["chosen_obs"].dtype == torch.float32
    assert item["chosen_actions"].shape == (H, ACT) and item["chosen_actions"].dtype == torch.float32
    assert item["chosen_mask"].dtype == torch.bool and item["chosen_mask"].all()
    assert item["tie"].dtype == torch.bool and item["tie"].ndim == 0
    assert item["index"].dtype == torch.int64 and item["index"].item() == 2
    np.testing.assert_array_equal(item["rejected_obs"].numpy(), cols["rejected_obs"][2])
    assert ds.tie.tolist() == cols["tie"].tolist()

    again = load_segment_pairs(save_segment_pairs(ds, tmp_path / "again.npz"))
    for key, value in ds.arrays().items():
        np.testing.assert_array_equal(again.arrays()[key], value)


def test_datasets_folder_roundtrip_discrete(tmp_path, rng):
    cols = _paired(rng, discrete=True)
    ds = load_segment_pairs(_write_dataset(tmp_path / "hf", cols))
    assert ds.discrete and ds.act_dim is None
    assert ds.chosen_actions.dtype == torch.int64 and ds.chosen_actions.shape == (N, H)
    np.testing.assert_array_equal(ds.chosen_actions.numpy(), cols["chosen_actions"])
    np.testing.assert_allclose(ds.rejected_obs.numpy(), cols["rejected_obs"])

    again = load_segment_pairs(save_segment_pairs(ds, tmp_path / "again_hf"))
    for key, value in ds.arrays().items():
        np.testing.assert_array_equal(again.arrays()[key], value)


def test_dataset_dict_folder_with_split(tmp_path, rng):
    cols = _paired(rng)
    d = datasets.Dataset.from_dict({k: [r.tolist() for r in v] for k, v in cols.items()})
    datasets.DatasetDict({"train": d, "test": d.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_segment_pairs(tmp_path / "dd", split="test")) == 2
    with pytest.raises(PrefoptError, match="split=None.*train, test"):
        load_segment_pairs(tmp_path / "dd")


def test_ragged_datasets_rows_are_padded_and_masked(tmp_path, rng):
    lengths_c, lengths_r = [2, 4, 3], [5, 1, 2]
    cols = {
        "chosen_obs": [rng.normal(size=(h, OBS)) for h in lengths_c],
        "chosen_actions": [rng.normal(size=(h, ACT)) for h in lengths_c],
        "rejected_obs": [rng.normal(size=(h, OBS)) for h in lengths_r],
        "rejected_actions": [rng.normal(size=(h, ACT)) for h in lengths_r],
    }
    ds = load_segment_pairs(_write_dataset(tmp_path / "ragged", cols))
    assert ds.horizon == 5
    assert ds.chosen_mask.sum(1).tolist() == lengths_c
    assert ds.rejected_mask.sum(1).tolist() == lengths_r
    assert (ds.chosen_obs[0, 2:] == 0).all() and (ds.chosen_actions[0, 2:] == 0).all()
    np.testing.assert_allclose(ds.chosen_obs[1, :4].numpy(), cols["chosen_obs"][1], rtol=1e-6)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert batch["chosen_obs"].shape == (3, 5, OBS) and batch["chosen_mask"].shape == (3, 5)
    assert batch["index"].tolist() == [0, 1, 2] and batch["tie"].dtype == torch.bool


def test_in_memory_padding_and_explicit_mask(rng):
    mask = np.ones((N, H), dtype=bool)
    mask[0, 3:] = False
    ds = SegmentPairs(
        [rng.normal(size=(3, OBS)) for _ in range(N)],
        [rng.normal(size=(3, ACT)) for _ in range(N)],
        rng.normal(size=(N, H, OBS)),
        rng.normal(size=(N, H, ACT)),
        rejected_mask=mask.astype(np.int8),
    )
    assert ds.horizon == H
    assert ds.chosen_mask.sum(1).tolist() == [3] * N  # shorter side padded to H
    assert ds.rejected_mask[0].tolist() == [True, True, True, False]
    assert ds.rejected_mask[1:].all()


def test_ab_label_layout_orders_pairs(tmp_path, rng):
    a_obs, b_obs = np.zeros((3, H, OBS)), np.ones((3, H, OBS))
    mask_b = np.ones((3, H), dtype=bool)
    mask_b[1, -1] = False
    path = tmp_path / "ab.npz"
    np.savez(
        path, obs_a=a_obs, actions_a=np.zeros((3, H), np.int64), obs_b=b_obs, actions_b=np.ones((3, H), np.int64),
        mask_b=mask_b, label=np.array([0.0, 1.0, 0.5]),
    )
    ds = load_segment_pairs(path)
    assert ds.chosen_obs[:, 0, 0].tolist() == [0.0, 1.0, 0.0]
    assert ds.rejected_obs[:, 0, 0].tolist() == [1.0, 0.0, 1.0]
    assert ds.chosen_actions[:, 0].tolist() == [0, 1, 0]
    assert ds.tie.tolist() == [False, False, True]
    assert ds.chosen_mask[1, -1].item() is False and ds.rejected_mask[1].all()


def _segments(rng, n=40):
    obs = rng.normal(size=(n, H, OBS)).astype(np.float32)
    # reward of a segment = its observation's first feature, so chosen can be checked from obs
    rewards = obs[..., 0].copy()
    return {"obs": obs, "actions": rng.normal(size=(n, H, ACT)).astype(np.float32), "rewards": rewards}


def test_teacher_labelled_loading(tmp_path, rng):
    cols = _segments(rng)
    path = tmp_path / "segs.npz"
    np.savez(path, **cols)
    ds = load_segment_pairs(path, teacher=ScriptedTeacher("oracle"), num_pairs=100, seed=1)
    assert len(ds) == 100
    assert (ds.chosen_obs[..., 0].sum(1) >= ds.rejected_obs[..., 0].sum(1)).all()
    assert (ds.pair_indices[:, 0] != ds.pair_indices[:, 1]).all()
    np.testing.assert_array_equal(ds.chosen_obs.numpy(), cols["obs"][ds.pair_indices[:, 0].numpy()])
    same = load_segment_pairs(path, teacher=ScriptedTeacher("oracle"), num_pairs=100, seed=1)
    assert torch.equal(same.pair_indices, ds.pair_indices)


def test_teacher_skip_and_equal_when_loading(rng):
    cols = _segments(rng, n=60)
    returns = cols["rewards"].sum(1)
    thr = float(np.median(returns))
    ds = pair_segments(**cols, teacher=ScriptedTeacher("skip", skip_threshold=thr), num_pairs=200)
    assert 0 < len(ds) < 200
    best = np.maximum(returns[ds.pair_indices[:, 0]], returns[ds.pair_indices[:, 1]])
    assert (best > thr).all()
    eq = pair_segments(**cols, teacher=ScriptedTeacher("equal", equal_threshold=0.5), num_pairs=200)
    gap = np.abs(returns[eq.pair_indices[:, 0]] - returns[eq.pair_indices[:, 1]])
    assert eq.tie.numpy().tolist() == (gap < 0.5).tolist() and eq.tie.any()


def test_teacher_sees_only_masked_steps(rng):
    obs = np.zeros((2, 3, 1))
    rewards = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    mask = np.array([[1, 1, 1], [1, 1, 0]])
    ds = pair_segments(obs, np.zeros((2, 3), np.int64), rewards, ScriptedTeacher(), mask, num_pairs=4)
    assert (ds.pair_indices[:, 0] == 0).all()  # segment 1's reward of 5 is padding


def test_unlabelled_needs_teacher_and_labelled_refuses_one(tmp_path, rng):
    np.savez(tmp_path / "segs.npz", **_segments(rng))
    with pytest.raises(PrefoptError, match="segs.npz.*teacher="):
        load_segment_pairs(tmp_path / "segs.npz")
    np.savez(tmp_path / "pairs.npz", **_paired(rng))
    with pytest.raises(PrefoptError, match="pairs.npz.*already labelled"):
        load_segment_pairs(tmp_path / "pairs.npz", teacher=ScriptedTeacher())
    with pytest.raises(PrefoptError, match="skipped all"):
        load_segment_pairs(tmp_path / "segs.npz", teacher=ScriptedTeacher("skip", skip_threshold=1e9))


# ---------------------------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp_path):
    with pytest.raises(PrefoptError, match="nope.npz: no such file"):
        load_segment_pairs(tmp_path / "nope.npz")


def test_unknown_format(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(PrefoptError, match=r"data.csv: unknown format.*'\.csv'.*\.npz"):
        load_segment_pairs(tmp_path / "data.csv")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PrefoptError, match="plain: unknown format \\(folder\\)"):
        load_segment_pairs(tmp_path / "plain")


def test_empty_and_corrupt_files(tmp_path, rng):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(PrefoptError, match="empty.npz: is empty"):
        load_segment_pairs(tmp_path / "empty.npz")
    cols = {k: v[:0] for k, v in _paired(rng).items()}
    np.savez(tmp_path / "zero.npz", **cols)
    with pytest.raises(PrefoptError, match="zero.npz: is empty"):
        load_segment_pairs(tmp_path / "zero.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(PrefoptError, match="junk.npz: cannot be read"):
        load_segment_pairs(tmp_path / "junk.npz")
    (tmp_path / "blank.npz").write_bytes(b"")
    with pytest.raises(PrefoptError, match="blank.npz: cannot be read"):
        load_segment_pairs(tmp_path / "blank.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    (tmp_path / "single.npy").rename(tmp_path / "single.npz")
    with pytest.raises(PrefoptError, match="single.npz: holds a single array"):
        load_segment_pairs(tmp_path / "single.npz")


def test_object_arrays_are_refused(tmp_path, rng):
    cols = _paired(rng)
    cols["tie"] = np.array([None] * N, dtype=object)
    np.savez(tmp_path / "obj.npz", **cols)
    with pytest.raises(PrefoptError, match="obj.npz: key 'tie'.*pickle"):
        load_segment_pairs(tmp_path / "obj.npz")


def test_missing_and_misnamed_keys(tmp_path, rng):
    cols = _paired(rng)
    cols["chosen_observations"] = cols.pop("chosen_obs")
    np.savez(tmp_path / "typo.npz", **cols)
    with pytest.raises(PrefoptError) as e:
        load_segment_pairs(tmp_path / "typo.npz")
    msg = str(e.value)
    assert "typo.npz" in msg and "missing keys: chosen_obs" in msg and "unexpected keys: chosen_observations" in msg
    assert "rejected_actions" in msg  # expected keys listed
    np.savez(tmp_path / "none.npz", foo=np.zeros(3))
    with pytest.raises(PrefoptError, match="none.npz: no known layout; found keys: foo.*chosen_obs.*obs_a.*rewards"):
        load_segment_pairs(tmp_path / "none.npz")
    ab = {"obs_a": np.zeros((2, H, 1)), "actions_a": np.zeros((2, H, 1)), "obs_b": np.zeros((2, H, 1)), "actions_b": np.zeros((2, H, 1))}
    np.savez(tmp_path / "nolabel.npz", **ab)
    with pytest.raises(PrefoptError, match="nolabel.npz: missing keys: label"):
        load_segment_pairs(tmp_path / "nolabel.npz")


def test_misnamed_key_in_datasets_folder(tmp_path, rng):
    cols = _paired(rng)
    cols["chosen_act"] = cols.pop("chosen_actions")
    _write_dataset(tmp_path / "hf", cols)
    with pytest.raises(PrefoptError, match="hf: missing keys: chosen_actions; unexpected keys: chosen_act"):
        load_segment_pairs(tmp_path / "hf")


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda c: c.update(rejected_obs=np.zeros((N, H, OBS + 1))), "obs_dim mismatch.*'rejected_obs'"),
        (lambda c: c.update(rejected_actions=np.zeros((N, H, ACT + 1))), "action shape mismatch.*'rejected_actions'"),
        (lambda c: c.update(rejected_actions=np.zeros((N, H), np.int64)), "action shape mismatch.*'rejected_actions'"),
        (lambda c: c.update(rejected_obs=np.zeros((N - 1, H, OBS)), rejected_actions=np.zeros((N - 1, H, ACT))), "different numbers of rows"),
        (lambda c: c.update(chosen_actions=np.zeros((N, H + 1, ACT))), "'chosen_obs'.*'chosen_actions'.*disagree"),
        (lambda c: c.update(chosen_obs=np.zeros((N, H))), "'chosen_obs' has shape \\(6, 4\\); expected \\[N, H, obs_dim\\]"),
        (lambda c: c.update(chosen_actions=np.zeros((N, H, ACT), np.complex64)), "'chosen_actions' has dtype complex64"),
        (lambda c: c.update(chosen_actions=np.zeros((N, H, ACT), np.int64)), "'chosen_actions' is integer .* expected \\[N, H\\]"),
        (lambda c: c.update(chosen_mask=np.ones((N, H + 1), bool)), "'chosen_mask' has shape"),
        (lambda c: c.update(chosen_mask=np.full((N, H), 2)), "'chosen_mask' must hold bool or 0/1"),
        (lambda c: c.update(rejected_mask=np.eye(N, H, dtype=bool) * 0), "rejected segment in row 0 has no real step"),
        (lambda c: c.update(tie=np.zeros(N + 0, np.float32) + 0.5), "'tie' must hold bool or 0/1"),
    ],
)
def test_shape_and_dtype_mismatches(tmp_path, rng, change, pattern):
    cols = _paired(rng)
    change(cols)
    np.savez(tmp_path / "bad.npz", **cols)
    with pytest.raises(PrefoptError, match="bad.npz: .*" + pattern):
        load_segment_pairs(tmp_path / "bad.npz")


@pytest.mark.parametrize("key", ["chosen_obs", "rejected_actions"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_values_name_key_and_row(tmp_path, rng, key, bad):
    cols = _paired(rng)
    cols[key][3, 1, 0] = bad
    cols[key][5, 0, 0] = bad
    np.savez(tmp_path / "nan.npz", **cols)
    with pytest.raises(PrefoptError, match=f"nan.npz: key '{key}' has NaN or inf in row 3"):
        load_segment_pairs(tmp_path / "nan.npz")


def test_nonfinite_rewards_name_row(tmp_path, rng):
    cols = _segments(rng)
    cols["rewards"][7, 2] = np.nan
    np.savez(tmp_path / "r.npz", **cols)
    with pytest.raises(PrefoptError, match="r.npz: key 'rewards' has NaN or inf in row 7"):
        load_segment_pairs(tmp_path / "r.npz", teacher=ScriptedTeacher())


def test_negative_discrete_action(tmp_path, rng):
    cols = _paired(rng, discrete=True)
    cols["chosen_actions"][4, 0] = -1
    np.savez(tmp_path / "neg.npz", **cols)
    with pytest.raises(PrefoptError, match="neg.npz: key 'chosen_actions' has a negative discrete action in row 4"):
        load_segment_pairs(tmp_path / "neg.npz")


@pytest.mark.parametrize("label, shown", [([0, 1, 2], "row 2 is 2.0"), ([0.5, -1, 0], "row 1 is -1.0")])
def test_labels_outside_allowed_set(tmp_path, label, shown):
    ab = {k: np.zeros((3, H, 1)) for k in ("obs_a", "actions_a", "obs_b", "actions_b")}
    np.savez(tmp_path / "lab.npz", **ab, label=np.array(label, dtype=np.float32))
    with pytest.raises(PrefoptError, match=f"lab.npz: key 'label' {shown}; allowed values: 0 .*1 .*0.5"):
        load_segment_pairs(tmp_path / "lab.npz")


def test_string_labels_refused(tmp_path):
    ab = {k: [np.zeros((H, 1)).tolist()] * 2 for k in ("obs_a", "actions_a", "obs_b", "actions_b")}
    datasets.Dataset.from_dict({**ab, "label": ["chosen", "tie"]}).save_to_disk(str(tmp_path / "strlab"))
    with pytest.raises(PrefoptError, match="strlab: key 'label' has dtype"):
        load_segment_pairs(tmp_path / "strlab")


def test_ragged_obs_and_actions_disagree_per_row(rng):
    with pytest.raises(PrefoptError, match="row 1 has 2 steps in 'chosen_obs' but 3 in 'chosen_actions'"):
        SegmentPairs(
            [np.zeros((3, 1)), np.zeros((2, 1))], [np.zeros((3, 1)), np.zeros((3, 1))],
            np.zeros((2, 3, 1)), np.zeros((2, 3, 1)),
        )


def test_pairing_needs_two_segments(rng):
    with pytest.raises(PrefoptError, match="pairing needs at least 2"):
        pair_segments(np.zeros((1, H, 1)), np.zeros((1, H, 1)), np.zeros((1, H)), ScriptedTeacher())
    with pytest.raises(PrefoptError, match="num_pairs=0"):
        pair_segments(np.zeros((3, H, 1)), np.zeros((3, H, 1)), np.zeros((3, H)), ScriptedTeacher(), num_pairs=0)
    with pytest.raises(PrefoptError, match="'rewards' has shape"):
        pair_segments(np.zeros((3, H, 1)), np.zeros((3, H, 1)), np.zeros((3, H + 2)), ScriptedTeacher())


def test_json_is_not_a_datasets_folder(tmp_path):
    folder = tmp_path / "fake"
    folder.mkdir()
    (folder / "state.json").write_text(json.dumps({}))
    with pytest.raises(PrefoptError, match="fake: unknown format"):
        load_segment_pairs(folder)
