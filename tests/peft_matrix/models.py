"""The small custom models of PEFT's `tests/test_custom_models.py`, keyed by PEFT's model ids.

Same layers, same attribute names, same forward as PEFT's classes (huggingface/peft, Apache-2.0; see
`cases.PEFT_REVISION`), so adapter keys, parameter counts and numbers line up with PEFT's own matrix.
`build(model_id)` is PEFT's `MockTransformerWrapper.from_pretrained` (seeded, cast to `dtype`, float32 by
default), `build_multi(tuner_method)` is `TestMultipleActiveAdapters.resolve_model_cls`, and `inputs()` is
their `prepare_inputs_for_testing`: `X = arange(90).view(9, 10)` (int64; the models cast it themselves).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import funcpeft.testing


class MLP(nn.Module):
    """X (B, 10) -> log-probs (B, 2)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class MLPWithGRU(nn.Module):
    """X (B, 10) -> (B, 2) through a one-step GRU (not built by any row; PEFT's tests use it elsewhere)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.gru = nn.GRU(input_size=20, hidden_size=20, num_layers=1, batch_first=True, bias=bias)
        self.fc = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = X.unsqueeze(1)
        X, _ = self.gru(X)
        X = X.squeeze(1)
        X = self.fc(X)
        X = self.sm(X)
        return X


class MLP_LayerNorm(nn.Module):
    """X (B, 10) -> (B, 2), a LayerNorm before each linear layer."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10, 10)  # PEFT passes 10 as `eps` too: kept for identical numbers
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.layernorm1 = nn.LayerNorm(20, 20)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = self.layernorm0(X)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.layernorm1(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class MLP2(nn.Module):
    """Like MLP with a hidden size of 32."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 32, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(32, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelEmbConv1D(nn.Module):
    """X (B, 10) token ids < 100 -> Embedding (5) -> transformers Conv1D (5 -> 1) -> (B, 2)."""

    def __init__(self, emb_size: int = 100) -> None:
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.emb(X)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv1D(nn.Module):
    """X (B, 10) -> (B, 1, 10) -> nn.Conv1d(1, 1, 2) -> (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = X.reshape(-1, 1, 10)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv1DBigger(nn.Module):
    """X (B, 10) -> 64 copies as channels (B, 64, 10) -> nn.Conv1d(64, 16, 2) -> (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(64, 16, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(144, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = X.reshape(-1, 1, 10)
        X = torch.concat([X] * 64, dim=1)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv1DGroups(nn.Module):
    """X (B, 10) -> 8 copies as channels -> nn.Conv1d(8, 8, 3, groups=2) -> (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(8, 8, 3, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(64, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype).reshape(-1, 1, 10)
        X = torch.concat([X] * 8, dim=1)
        X = self.conv1d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        return self.sm(X)


class ModelConv2D(nn.Module):
    """X (B, 10) viewed as (-1, 5, 3, 3) -> nn.Conv2d(5, 10, 3) -> (B', 2) with B' = 10 * B / 45 rows."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = X.reshape(-1, 5, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2D2(nn.Module):
    """X (B, 10) -> Linear(10, 40) -> (-1, 8, 3, 3) -> nn.Conv2d(8, 32, 3) -> (B', 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 40)
        self.conv2d = nn.Conv2d(8, 32, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(32, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = X.reshape(-1, 8, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelConv2D1x1(nn.Module):
    """X (B, 10) viewed as (-1, 1, 3, 3) -> 1x1 nn.Conv2d(1, 10) -> (B', 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(1, 10, kernel_size=(1, 1), padding=0)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10 * 3 * 3, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = X.reshape(-1, 1, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv2DGroups(nn.Module):
    """X (9, 10) flattened (90,) -> Linear(90, 288) -> (2, 16, 3, 3) -> nn.Conv2d(16, 16, 3, groups=8) -> (2, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        # groups=8 so that the default r=8 is divisible by groups (PEFT's comment)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = X.flatten()
        X = self.lin0(X)
        X = X.reshape(2, 16, 3, 3)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


class ModelConv2DGroups2(nn.Module):
    """Ignores X: a fixed (9, 16, 20, 20) arange input -> nn.Conv2d(16, 32, 3, padding=1, groups=2) -> (9, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        # PEFT: "needs a different input shape, thus ignore original input"
        X = torch.arange(9 * 16 * 20 * 20).view([9, 16, 20, 20]).to(self.conv2d.weight.device)
        X = X.to(self.dtype)
        X = self.conv2d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelConv1DKernel1(nn.Module):
    """X (B, 10) viewed as (-1, 3, 10) -> nn.Conv1d(3, 10, kernel_size=1) -> (B', 2) (no log-softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(in_channels=3, out_channels=10, kernel_size=1)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10 * 10, 2)
        self.dtype = torch.float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        x = x.reshape(-1, 3, 10)
        x = self.conv1d(x)
        x = self.relu(x)
        x = self.flat(x)
        x = self.lin0(x)
        return x


class ModelConv3D(nn.Module):
    """X (B, 10) stacked 3x on a new last dim, viewed as (-1, 5, 3, 3, 3) -> nn.Conv3d(5, 10, 3) -> (B', 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        if X.dim() == 2:  # a 2D image -> a 3D volume
            X = torch.stack([X] * 3, dim=-1)
        X = X.reshape(-1, 5, 3, 3, 3)
        X = self.conv3d(X)
        X = self.relu(X)
        X = self.flat(X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class ModelMha(nn.Module):
    """X (L=9, 10) (unbatched sequence) -> nn.MultiheadAttention(10, 2) -> (9, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X, _ = self.mha(X, X, X)
        X = self.lin0(X)
        X = self.sm(X)
        return X


class _LinearUsingParameter(nn.Module):
    """A linear layer written as `x @ weight + bias` on bare parameters (weight is (in, out))."""

    def __init__(self, in_features: int, out_features: int, bias: bool | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        if bias:
            self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    """MLP whose layers must be targeted with `target_parameters` (they are not nn.Linear)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = _LinearUsingParameter(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        X = self.lin0(X)
        X = self.relu(X)
        X = self.drop(X)
        X = self.lin1(X)
        X = self.sm(X)
        return X


# PEFT's model ids (MockTransformerWrapper.from_pretrained) -> constructor
MODELS: dict[str, Callable[[], nn.Module]] = {
    "MLP": MLP,
    "EmbConv1D": ModelEmbConv1D,
    "Conv1d": ModelConv1D,
    "Conv1dBigger": ModelConv1DBigger,
    "Conv1dGroups": ModelConv1DGroups,
    "Conv2d": ModelConv2D,
    "Conv2d1x1": ModelConv2D1x1,
    "Conv1dKernel1": ModelConv1DKernel1,
    "Conv2dGroups": ModelConv2DGroups,
    "Conv2dGroups2": ModelConv2DGroups2,
    "Conv3d": ModelConv3D,
    "MLP_LayerNorm": MLP_LayerNorm,
    "MLP2": MLP2,
    "Conv2d2": ModelConv2D2,
    "MHA": ModelMha,
    "MlpUsingParameters": MlpUsingParameters,
}


# funcpeft's own rows (tests/test_contract.py): tiny random transformers models, outputs compared on their logits
def _moe(kind: str) -> Callable[[], nn.Module]:
    return lambda: funcpeft.testing.TINY_MOE_MODELS[kind]().train(False)


TRANSFORMERS_MODELS: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": lambda: funcpeft.testing.tiny_llama().train(False),
    "tiny-llama-tied": lambda: funcpeft.testing.tiny_llama(tie=True).train(False),  # lm_head tied to embed_tokens
    "tiny-gpt2": lambda: funcpeft.testing.tiny_gpt2().train(False),
    "tiny-bert-seq-cls": lambda: funcpeft.testing.tiny_bert_seq_cls().train(False),
    **{f"tiny-{k.replace('_', '-')}": _moe(k) for k in funcpeft.testing.TINY_MOE_MODELS},
}


def build(model_id: str, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
    """PEFT's `MockTransformerWrapper.from_pretrained(model_id, dtype)`: seeded, cast to dtype (default float32).

    PEFT seeds the global RNG with 0 and leaves it advanced; here the global RNG state is restored afterwards
    so that building a model does not change what a later draw gives (`seed=0` gives PEFT's exact weights).
    """
    build = MODELS.get(model_id) or TRANSFORMERS_MODELS.get(model_id)
    if build is None:
        raise ValueError(f"model_id {model_id} not implemented; known: {sorted(MODELS) + sorted(TRANSFORMERS_MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().to(torch.float32 if dtype is None else dtype)


def build_multi(tuner_method: str, seed: int = 0) -> nn.Module:
    """PEFT's `TestMultipleActiveAdapters.resolve_model_cls` (after its `torch.manual_seed(0)`), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if tuner_method == "lora+trainable_tokens":  # needs an Embedding layer to target
            model: nn.Module = ModelEmbConv1D()
        elif tuner_method == "ia3":
            model = MLP(bias=False)
        else:
            model = MLP(bias=True)
    return model.eval()


def inputs(model_id: str = "MLP", seed: int = 0) -> dict[str, torch.Tensor]:
    """PEFT's `prepare_inputs_for_testing`: `{"X": arange(90).view(9, 10)}` for every model id (int64).

    `model_id` and `seed` are accepted for a uniform signature; PEFT's input is the same fixed tensor for all.
    """
    if model_id in TRANSFORMERS_MODELS:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(1, funcpeft.testing.VOCAB, (2, 7), generator=g)}
    if model_id not in MODELS:
        raise ValueError(f"model_id {model_id} not implemented; known: {sorted(MODELS) + sorted(TRANSFORMERS_MODELS)}")
    return {"X": torch.arange(90).view(9, 10)}
