"""A network trained for real (scikit-learn's digits, shipped with the package) keeps its
predictions and its accuracy once fused."""

import pytest
import torch

import resnet_fused

import models

datasets = pytest.importorskip("sklearn.datasets")


def train_digits_resnet(seed=0, epochs=12):
    torch.manual_seed(seed)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # 1797 x 1 x 8 x 8
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = perm[:1350], perm[1350:]
    model = models.CifarResNet(num_blocks=(1, 1), widths=(16, 32), num_classes=10, in_channels=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in train[torch.randperm(len(train))].split(64):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return model.eval(), x[test], y[test]


def test_trained_digits_predictions_unchanged():
    model, x_test, y_test = train_digits_resnet()
    fused = resnet_fused.fuse(model)
    with torch.inference_mode():
        eager_logits = model(x_test)
        fused_logits = fused(x_test)
    eager_pred, fused_pred = eager_logits.argmax(1), fused_logits.argmax(1)
    eager_acc = (eager_pred == y_test).float().mean().item()
    fused_acc = (fused_pred == y_test).float().mean().item()
    assert eager_acc > 0.9, f"training did not work (held-out accuracy {eager_acc:.3f})"
    assert torch.equal(fused_pred, eager_pred), (fused_pred != eager_pred).nonzero()
    assert fused_acc == eager_acc
    # BN was really trained (non-trivial statistics) and really folded.
    assert fused.fuse_report.counts().get("conv+bn+add+relu", 0) == 2
    import copy

    from conftest import assert_accuracy_rule

    with torch.inference_mode():
        ref = copy.deepcopy(model).double()(x_test.double())
    assert_accuracy_rule(fused_logits, [eager_logits], ref)
