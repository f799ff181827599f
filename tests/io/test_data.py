import numpy as np
import pytest
import torch

import valfree
from valfree.io.data import fashion_mnist_available, load_dataset, probe_batch


def test_digits_split_is_disjoint_and_standardised():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and train[0][0].shape == (1, 8, 8)
    x = train.tensors[0]
    assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0, rel=1e-3)


@pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST is installed by the setup on Debian")
def test_fashion_mnist_reads_idx_files():
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 10000 and test[0][0].shape == (1, 28, 28)
    assert sorted(test.tensors[1].unique().tolist()) == list(range(10))


def test_npz_with_and_without_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.rand(7, 3).astype(np.float32), y=np.arange(7))
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert len(ds) == 7 and int(ds[3][1]) == 3
    np.savez(tmp_path / "u.npz", x=np.random.rand(4, 3))
    assert (load_dataset(f"npz:{tmp_path / 'u.npz'}").tensors[1] == -1).all()
    np.savez(tmp_path / "o.npz", x=np.array([object()], dtype=object))
    with pytest.raises(valfree.ValfreeError, match="without pickle"):
        load_dataset(f"npz:{tmp_path / 'o.npz'}")


def test_module_function_spec(tmp_path):
    (tmp_path / "mydata.py").write_text(
        "import torch\nfrom torch.utils.data import TensorDataset\n"
        "def make(split='train'):\n    n = 5 if split == 'train' else 3\n"
        "    return TensorDataset(torch.randn(n, 2), torch.zeros(n, dtype=torch.long))\n"
    )
    assert len(load_dataset(f"{tmp_path / 'mydata.py'}:make", "test")) == 3


@pytest.mark.parametrize("spec,match", [("imagenet", "unknown data spec 'imagenet'"), ("npz:", "needs a path"),
                                        ("npz:/no/such.npz", "does not exist"),
                                        ("fashion-mnist:/no/dir", "apt-get install dataset-fashion-mnist")])
def test_bad_specs(spec, match):
    with pytest.raises(valfree.ValfreeError, match=match):
        load_dataset(spec)


def test_probe_batch_is_fixed_by_seed():
    ds = load_dataset("digits")
    a, b, c = probe_batch(ds, 64, 0), probe_batch(ds, 64, 0), probe_batch(ds, 64, 1)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0]) and a[0].shape[0] == 64
