"""Data loading: every source gives three disjoint, stratified, normalised splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autosparse.config.schema import ConfigError
from autosparse.config.sections import DataConfig
from autosparse.workload.data import load_data, stratified_split
from autosparse.workload.splits import DataSplits


def _tensors(splits: DataSplits, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = getattr(splits, name)
    return dataset.tensors[0], dataset.tensors[1]


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data(DataConfig(source="sklearn-digits"))


def test_digits_splits_sizes_shapes_and_normalisation(digits):
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    sizes = [len(digits.train), len(digits.validation), len(digits.test)]
    assert sum(sizes) == 1797
    assert sizes == [1078, 359, 360]  # round(0.6 * 1797), round(0.2 * 1797), the rest
    x, y = _tensors(digits, "train")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2
    sample_x, sample_y = digits.train[0]
    assert sample_x.shape == (1, 8, 8) and int(sample_y) in range(10)


def _sorted_rows(x: np.ndarray) -> np.ndarray:
    rows = x.reshape(len(x), -1).round(4)
    return rows[np.lexsort(rows.T[::-1])]


def test_digits_splits_are_stratified_and_partition_the_data(digits):
    for name in ("train", "validation", "test"):
        counts = np.bincount(_tensors(digits, name)[1].numpy(), minlength=10)
        share = counts / counts.sum()
        assert np.all(np.abs(share - 0.1) < 0.02), (name, counts)
    # every image lands in exactly one split: the union equals the data set as a multiset
    from sklearn.datasets import load_digits

    raw = load_digits().images / 16.0
    normalised = (raw - digits.mean[0]) / digits.std[0]
    names = ("train", "validation", "test")
    together = np.concatenate([_tensors(digits, n)[0].numpy() for n in names])
    assert np.allclose(_sorted_rows(together), _sorted_rows(normalised), atol=1e-3)


def test_stratified_split_indices_are_disjoint_and_complete():
    y = np.repeat(np.arange(10), 50)
    parts = stratified_split(y, (0.6, 0.2, 0.2), seed=0)
    joined = np.concatenate(parts)
    assert len(joined) == 500 and len(set(joined.tolist())) == 500


def test_split_seed_changes_the_split_and_is_repeatable():
    y = np.repeat(np.arange(3), 20)
    a = stratified_split(y, (0.6, 0.2, 0.2), seed=1)
    b = stratified_split(y, (0.6, 0.2, 0.2), seed=1)
    c = stratified_split(y, (0.6, 0.2, 0.2), seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    for part, size in zip(a, (36, 12, 12)):
        assert len(part) == size
        assert np.bincount(y[part]).tolist() == [size // 3] * 3


def test_split_too_small_is_a_config_error():
    with pytest.raises(ConfigError, match="too few"):
        stratified_split(np.array([0, 1]), (0.6, 0.2, 0.2), seed=0)


def test_loader_shuffles_repeatably_and_checks_split_name(digits):
    first = next(iter(digits.loader("train", 16, shuffle=True, seed=3)))[1]
    again = next(iter(digits.loader("train", 16, shuffle=True, seed=3)))[1]
    other = next(iter(digits.loader("train", 16, shuffle=True, seed=4)))[1]
    plain = next(iter(digits.loader("train", 16)))[1]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(plain, digits.train.tensors[1][:16])
    with pytest.raises(ValueError, match="train, validation, test"):
        digits.loader("val", 16)


def test_given_mean_and_std_are_used():
    splits = load_data(DataConfig(mean=[0.5], std=[0.25]))
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images / 16.0)
    x = splits.train.tensors[0]
    assert float(x.min()) == pytest.approx((0 - 0.5) / 0.25)
    assert float(x.max()) == pytest.approx((float(raw.max()) - 0.5) / 0.25)
    with pytest.raises(ConfigError) as err:
        load_data(DataConfig(mean=[0.5, 0.5, 0.5]))
    assert str(err.value) == "data.mean has 3 values; the data has 1 channel: give one value"


# ------------------------------------------------------------------------------------ npz


def _npz(tmp_path, name="data.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _labels(n: int, classes: int = 3) -> np.ndarray:
    return np.arange(n) % classes


@pytest.mark.parametrize(
    "layout, raw_shape, expected_shape",
    [
        ("NCHW", (60, 2, 4, 5), (2, 4, 5)),
        ("NHWC", (60, 4, 5, 2), (2, 4, 5)),
        ("NCHW", (60, 4, 5), (1, 4, 5)),
        ("NCL", (60, 3, 7), (3, 7)),
        ("NLC", (60, 7, 3), (3, 7)),
        ("flat", (60, 6), (6,)),
    ],
)
def test_npz_layouts(tmp_path, layout, raw_shape, expected_shape):
    x = np.random.default_rng(0).normal(size=raw_shape).astype(np.float32)
    path = _npz(tmp_path, x=x, y=_labels(60))
    splits = load_data(DataConfig(source="npz", path=path, layout=layout))
    assert splits.input_shape == expected_shape
    assert splits.num_classes == 3
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 60
    train_x = splits.train.tensors[0]
    per_channel = train_x.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(expected_shape[0]), atol=1e-5)


def test_npz_nhwc_is_transposed_not_reshaped(tmp_path):
    x = np.zeros((30, 2, 2, 3), dtype=np.float32)
    x[..., 1] = 1.0  # channel 1 is all ones
    x[::2, ..., 2] = 5.0
    path = _npz(tmp_path, x=x, y=_labels(30))
    splits = load_data(DataConfig(source="npz", path=path, layout="NHWC", mean=[0.0], std=[1.0]))
    train_x = splits.train.tensors[0]
    assert train_x.shape[1:] == (3, 2, 2)
    assert torch.all(train_x[:, 1] == 1.0) and torch.all(train_x[:, 0] == 0.0)


def test_npz_fixed_split_keys(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(
        tmp_path,
        images_train=rng.normal(size=(20, 5)), labels_train=_labels(20, 4),
        images_validation=rng.normal(size=(7, 5)), labels_validation=_labels(7, 4),
        images_test=rng.normal(size=(9, 5)), labels_test=_labels(9, 4),
    )
    cfg = DataConfig(source="npz", path=path, x_key="images", y_key="labels", layout="flat")
    splits = load_data(cfg)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (20, 7, 9)
    assert splits.num_classes == 4


def test_npz_fixed_train_test_carves_validation(tmp_path):
    rng = np.random.default_rng(0)
    path = _npz(
        tmp_path,
        x_train=rng.normal(size=(40, 3)), y_train=_labels(40, 2),
        x_test=rng.normal(size=(10, 3)), y_test=_labels(10, 2),
    )
    splits = load_data(DataConfig(source="npz", path=path, layout="flat"))
    # validation / (train + validation) = 0.2 / 0.8 of the fixed train split
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (30, 10, 10)


def test_npz_val_suffix_and_uint8_scaling(tmp_path):
    x = np.full((6, 1, 2, 2), 255, dtype=np.uint8)
    path = _npz(
        tmp_path, x_train=x, y_train=_labels(6, 2), x_val=x[:2], y_val=_labels(2, 2),
        x_test=x[:2], y_test=_labels(2, 2),
    )
    splits = load_data(DataConfig(source="npz", path=path, mean=[0.5], std=[0.5]))
    assert len(splits.validation) == 2
    assert torch.allclose(splits.train.tensors[0], torch.ones(6, 1, 2, 2))


def test_npz_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.npz")
    with pytest.raises(ConfigError, match="nope.npz"):
        load_data(DataConfig(source="npz", path=path))


def test_npz_missing_key_lists_available_keys(tmp_path):
    path = _npz(tmp_path, inputs=np.zeros((10, 3)), targets=_labels(10))
    with pytest.raises(ConfigError) as err:
        load_data(DataConfig(source="npz", path=path, layout="flat"))
    assert "'x'" in str(err.value) and "inputs" in str(err.value) and "targets" in str(err.value)


def test_npz_fixed_split_missing_test_key(tmp_path):
    path = _npz(tmp_path, x_train=np.zeros((10, 3)), y_train=_labels(10))
    with pytest.raises(ConfigError, match="x_test"):
        load_data(DataConfig(source="npz", path=path, layout="flat"))


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.linspace(0, 1, 30), "integer"),
        (np.arange(30) % 3 - 1, "0..K-1"),
        (np.eye(3)[np.arange(30) % 3], "one integer"),
    ],
)
def test_npz_bad_labels(tmp_path, labels, message):
    path = _npz(tmp_path, x=np.zeros((30, 4)), y=labels)
    with pytest.raises(ConfigError, match=message):
        load_data(DataConfig(source="npz", path=path, layout="flat"))


def test_npz_float_integral_labels_are_accepted(tmp_path):
    path = _npz(tmp_path, x=np.zeros((30, 4)), y=(np.arange(30) % 3).astype(np.float64))
    splits = load_data(DataConfig(source="npz", path=path, layout="flat"))
    assert splits.train.tensors[1].dtype == torch.int64 and splits.num_classes == 3


def test_npz_wrong_rank_for_layout(tmp_path):
    path = _npz(tmp_path, x=np.zeros((30, 4)), y=_labels(30))
    with pytest.raises(ConfigError, match="layout NCHW needs 4-D"):
        load_data(DataConfig(source="npz", path=path, layout="NCHW"))


def test_npz_length_mismatch(tmp_path):
    path = _npz(tmp_path, x=np.zeros((30, 4)), y=_labels(29))
    with pytest.raises(ConfigError, match="30 samples and y has 29"):
        load_data(DataConfig(source="npz", path=path, layout="flat"))


# ---------------------------------------------------------------------------- image folder


def _write_images(root, sizes: dict[str, list[tuple[int, int]]]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, shapes in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(shapes):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(root / cls / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")


def test_image_folder_resize_and_grayscale(tmp_path):
    root = tmp_path / "images"
    _write_images(root, {"cat": [(6, 5), (7, 7)] * 5, "ant": [(9, 4)] * 10, "bee": [(5, 5)] * 10})
    cfg = DataConfig(source="image-folder", path=str(root), image_size=[4, 6], grayscale=True)
    splits = load_data(cfg)
    assert splits.classes == ("ant", "bee", "cat")
    assert splits.input_shape == (1, 4, 6) and splits.num_classes == 3
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (18, 6, 6)
    for name in ("train", "validation", "test"):
        assert sorted(set(splits.split(name).tensors[1].tolist())) == [0, 1, 2]

    rgb = load_data(cfg.model_copy(update={"grayscale": False}))
    assert rgb.input_shape == (3, 4, 6) and len(rgb.mean) == 3


def test_image_folder_sizes_must_match_without_image_size(tmp_path):
    root = tmp_path / "images"
    _write_images(root, {"cat": [(6, 5)] * 5, "dog": [(8, 8)] * 5})
    with pytest.raises(ConfigError, match="image_size"):
        load_data(DataConfig(source="image-folder", path=str(root)))


def test_image_folder_same_size_needs_no_resize(tmp_path):
    root = tmp_path / "images"
    _write_images(root, {"cat": [(5, 3)] * 5, "dog": [(5, 3)] * 5})
    splits = load_data(DataConfig(source="image-folder", path=str(root)))
    assert splits.input_shape == (3, 3, 5)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_data(DataConfig(source="image-folder", path=str(tmp_path / "missing")))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ConfigError, match="has no images"):
        load_data(DataConfig(source="image-folder", path=str(tmp_path / "empty")))


def test_torchvision_missing_gives_clear_error(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="install the torchvision"):
        load_data(DataConfig(source="torchvision", path=str(tmp_path), name="MNIST"))


def test_fingerprint_ignores_batch_size_but_not_split_seed():
    from autosparse.workload.data import data_fingerprint

    base = DataConfig()
    assert data_fingerprint(base) == data_fingerprint(DataConfig(batch_size=7))
    assert data_fingerprint(base) != data_fingerprint(DataConfig(split_seed=1))


def test_data_batch_size_is_the_evaluation_batch():
    """``data.batch_size`` is read: validation, test and export score in batches of it."""
    from autosparse.workload.evaluate import evaluate

    splits = load_data(DataConfig(batch_size=7))
    assert splits.batch_size == 7
    first, _ = next(iter(splits.loader("validation", splits.batch_size)))
    assert first.shape[0] == 7
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    assert 0 <= evaluate(model, splits.loader("validation", splits.batch_size)) <= 100
