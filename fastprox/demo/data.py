"""The demo's data: sets that ship with scikit-learn, so nothing is downloaded."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    y_scale: float = 1.0  # a standardized target's deviation in the original units

    def to(self, device) -> "Split":
        return Split(self.x_train.to(device), self.y_train.to(device), self.x_test.to(device),
                     self.y_test.to(device), self.y_scale)


def _sklearn():
    try:
        import sklearn.datasets
        import sklearn.model_selection
    except ImportError as exc:
        raise ImportError("the fastprox demo needs scikit-learn for its data sets "
                          "(pip install scikit-learn, or pip install fastprox[demo])") from exc
    return sklearn


def _split(sk, x, y, seed: int, validation: bool, stratify: bool):
    """25 % test split; with ``validation``, the training part is split again (25 %) and its
    held-out part is returned as the test set, so that settings can be chosen without the test
    set."""
    x_train, x_test, y_train, y_test = sk.model_selection.train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y if stratify else None)
    if validation:
        x_train, x_test, y_train, y_test = sk.model_selection.train_test_split(
            x_train, y_train, test_size=0.25, random_state=seed,
            stratify=y_train if stratify else None)
    return x_train, x_test, y_train, y_test


def digits(seed: int = 0, images: bool = False, validation: bool = False) -> Split:
    """sklearn DIGITS (1797 8x8 images, 10 classes), 25 % test split, min-max scaled with the
    training set's range (Scardapane et al.'s set-up). ``images``: shape (N, 1, 8, 8) instead of
    (N, 64)."""
    sk = _sklearn()
    data = sk.datasets.load_digits()
    x_train, x_test, y_train, y_test = _split(sk, data.data, data.target, seed, validation, True)
    lo, hi = x_train.min(axis=0), x_train.max(axis=0)
    span = hi - lo
    span[span == 0] = 1.0  # a pixel that is constant in training scales to 0

    def prep(x):
        x = torch.as_tensor((x - lo) / span, dtype=torch.float32)
        return x.reshape(-1, 1, 8, 8) if images else x

    return Split(prep(x_train), torch.as_tensor(y_train), prep(x_test), torch.as_tensor(y_test))


def diabetes(seed: int = 0, validation: bool = False) -> Split:
    """sklearn diabetes (442 patients, 10 features, a disease-progression score), 25 % test
    split; features and target standardized with the training set's mean and deviation (the
    demo reports MSE in the original units)."""
    sk = _sklearn()
    data = sk.datasets.load_diabetes()
    x_train, x_test, y_train, y_test = _split(sk, data.data, data.target, seed, validation,
                                              False)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    y_mean, y_std = y_train.mean(), y_train.std()

    def prep(x):
        return torch.as_tensor((x - mean) / std, dtype=torch.float32)

    def target(y):
        return torch.as_tensor((y - y_mean) / y_std, dtype=torch.float32)[:, None]

    return Split(prep(x_train), target(y_train), prep(x_test), target(y_test), float(y_std))
