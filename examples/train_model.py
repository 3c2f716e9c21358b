"""Train the example model: a small Llama on the example encyclopedia, on CPU, in minutes.

The model is m3compile's own runtime (`m3compile/model.py`), saved as an ordinary Hugging Face
Llama checkpoint (config.json + model.safetensors + tokenizer files) that `load_checkpoint` and
transformers both read. Grouped-query attention (4 query heads, 2 kv heads) on purpose: Memory³
stores its memories per kv head (paper §3.3).

Every training text is one row that starts at position 0 with `<s>` and ends with `</s>`, the way
`m3 compile` feeds a reference, right-padded within a batch. Loss is next-token cross-entropy over
the real tokens. AdamW, linear warmup then cosine decay, gradient clipping; bf16 autocast on CPUs with bf16 units
(measured on this 2-core AVX512-BF16 machine, one thread, 100 steps of the default config: 9-10 s
against 16 s in float32). The weights stay float32. One thread by default: with two, the run took
5x longer while other jobs shared the cores. Seeded: same config, same machine, same thread count
-> the same loss curve (measured: bitwise the same weights).

After training it reports per-token perplexity on the training texts and on the questions (a
phrasing the model never saw), and the share of question answers whose every token is the
model's greedy next-token choice. Everything goes into `training.json` beside the weights.

    python examples/train_model.py                          # -> examples/model/ (all entities)
    python examples/train_model.py --entities-file train_ids.txt --out /tmp/m --steps 2000
"""

import argparse
import dataclasses
import json
import math
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing m3compile

from m3compile.model import ModelArgs, Transformer, bf16_is_native, save_checkpoint  # noqa: E402
from m3compile.tokenizer import Tokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
KINDS = ("article", "restatement", "question")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # drives init, batch order and nothing else
    steps: int = 600  # optimizer steps
    batch_size: int = 16  # texts per step
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # end of the cosine decay
    warmup_steps: int = 40  # linear warmup from 0
    weight_decay: float = 0.1  # AdamW, on matrices only
    grad_clip: float = 1.0  # max global gradient norm
    # bf16 autocast for the forward pass (weights and optimizer stay float32), where the CPU has bf16
    # units (AMX, AVX512-BF16); on AVX2 alone torch emulates bf16 matmuls 34x slower than float32
    bf16: bool = bf16_is_native("cpu")
    threads: int = 1  # torch intra-op threads; part of what makes a run repeatable
    max_len: int = 512  # tokens per text incl. <s> and </s>; longer texts are cut
    log_every: int = 25  # steps between loss records
    kinds: str = "article,restatement"  # which texts to train on, comma-separated from KINDS
    # the model (m3compile ModelArgs)
    dim: int = 128  # residual width
    n_layers: int = 4
    n_heads: int = 4  # query heads
    n_kv_heads: int = 2  # kv heads (memories are stored per kv head)
    head_dim: int = 32  # dim / n_heads; a multiple of 16 so m3's int8/int4 groups fit
    hidden_dim: int = 384  # SwiGLU width, ~8/3 * dim rounded up to 64
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # config max_position_embeddings
    init_std: float = 0.02  # normal init of every matrix


class Text(NamedTuple):
    entity: str  # entity id (= article file stem)
    kind: str  # "article", "restatement" or "question"
    text: str
    facts: list  # [{"key", "value", "start", "end"}] answer spans; [] for articles


def load_texts(corpus_dir: Path, facts_dir: Path, kinds, entities=None) -> list[Text]:
    """Articles, restatements and questions of the chosen entities (all when `entities` is None)."""
    out = []
    if "article" in kinds:
        for p in sorted(Path(corpus_dir).glob("*.md")):
            if entities is None or p.stem in entities:
                out.append(Text(p.stem, "article", p.read_text(encoding="utf-8"), []))
    for kind, name in (("restatement", "restatements.jsonl"), ("question", "questions.jsonl")):
        if kind in kinds:
            for line in (Path(facts_dir) / name).read_text(encoding="utf-8").splitlines():
                r = json.loads(line)
                if entities is None or r["entity"] in entities:
                    out.append(Text(r["entity"], kind, r["text"], r["facts"]))
    assert out, (corpus_dir, facts_dir, kinds)
    return out


def encode(tok: Tokenizer, texts: list[Text], max_len: int) -> list[list[int]]:
    return [([tok.bos_id] + tok.encode(t.text) + [tok.eos_id])[:max_len] for t in texts]


def pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)  # (B, T) True = real token
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = True
    return tokens, mask


def token_nll(model: Transformer, tokens: torch.Tensor, mask: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Next-token negative log-likelihood [B, T-1], 0 where the target is padding."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(tokens[:, :-1], attention_mask=mask[:, :-1])  # (B, T-1, V)
    nll = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T-1)
    return nll * mask[:, 1:]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))


def model_args(cfg: TrainConfig, vocab_size: int) -> ModelArgs:
    return ModelArgs(vocab_size=vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                     n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_dim=cfg.hidden_dim,
                     norm_eps=1e-5, rope_theta=cfg.rope_theta, max_seq_len=cfg.max_seq_len)


def train(cfg: TrainConfig, seqs: list[list[int]], vocab_size: int, pad_id: int, log=print):
    """Train a fresh model on token sequences; returns (model, [(step, loss), ...])."""
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    model = Transformer(model_args(cfg, vocab_size)).init_weights(cfg.seed, std=cfg.init_std).train()
    decay = [p for n, p in sorted(model.named_parameters()) if p.dim() >= 2]
    no_decay = [p for n, p in sorted(model.named_parameters()) if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    order, history, running = [], [], []
    for step in range(cfg.steps):
        while len(order) < cfg.batch_size:  # epochs in a fresh seeded order, batches never straddle two
            epoch = list(range(len(seqs)))
            rng.shuffle(epoch)
            order += epoch
        batch, order = order[: cfg.batch_size], order[cfg.batch_size:]
        tokens, mask = pad([seqs[i] for i in batch], pad_id)  # (B, T) each
        nll = token_nll(model, tokens, mask, cfg.bf16)  # (B, T-1)
        loss = nll.sum() / mask[:, 1:].sum()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            history.append((step + 1, round(sum(running) / len(running), 4)))
            running = []
            log(f"step {step + 1}/{cfg.steps} loss {history[-1][1]:.4f} lr {lr_at(step, cfg):.2e}")
    return model.eval(), history


@torch.no_grad()
def evaluate(model: Transformer, tok: Tokenizer, texts: list[Text], max_len: int, bf16: bool,
             batch_size: int = 32) -> dict:
    """Per-token perplexity over all texts, and greedy accuracy on every recorded answer span."""
    total_nll, n_tokens, hits, n_facts = 0.0, 0, 0, 0
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        encs = [tok.encode_with_offsets(t.text) for t in chunk]
        tokens, mask = pad([([tok.bos_id] + ids + [tok.eos_id])[:max_len] for ids, _ in encs], tok.eos_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens[:, :-1], attention_mask=mask[:, :-1]).float()  # (B, T-1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none") * mask[:, 1:]  # (B, T-1)
        total_nll += nll.sum().item()
        n_tokens += int(mask[:, 1:].sum())
        correct = logits.argmax(-1) == tokens[:, 1:]  # (B, T-1); column j predicts text token j
        for b, (t, (ids, offsets)) in enumerate(zip(chunk, encs)):
            for f in t.facts:
                cols = [j for j, (s, e) in enumerate(offsets) if s < f["end"] and e > f["start"]]
                if cols and cols[-1] < max_len - 2:
                    n_facts += 1
                    hits += all(bool(correct[b, j]) for j in cols)
    return {"texts": len(texts), "tokens": n_tokens, "nll": round(total_nll / n_tokens, 4),
            "perplexity": round(math.exp(total_nll / n_tokens), 3), "facts": n_facts,
            "fact_accuracy": round(hits / n_facts, 4) if n_facts else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus-dir", type=Path, default=HERE / "corpus")
    ap.add_argument("--facts-dir", type=Path, default=HERE / "facts")
    ap.add_argument("--tokenizer-dir", type=Path, default=HERE / "tokenizer")
    ap.add_argument("--out", type=Path, default=HERE / "model")
    ap.add_argument("--entities-file", type=Path, help="train only on these entity ids, one per line")
    # every TrainConfig field is a flag with the dataclass default (defaults live in one place)
    for f in dataclasses.fields(TrainConfig):
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if f.type in (bool, "bool") else type(f.default)
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default)
    a = ap.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)})
    kinds = tuple(cfg.kinds.split(","))
    assert set(kinds) <= set(KINDS), kinds
    entities = None
    if a.entities_file:
        entities = {ln.strip() for ln in a.entities_file.read_text().splitlines() if ln.strip()}

    tok = Tokenizer.from_dir(a.tokenizer_dir)
    texts = load_texts(a.corpus_dir, a.facts_dir, kinds, entities)
    seqs = encode(tok, texts, cfg.max_len)
    print(f"{len(texts)} texts, {sum(map(len, seqs))} tokens, vocab {tok.vocab_size}", file=sys.stderr)
    t0 = time.perf_counter()
    model, history = train(cfg, seqs, tok.vocab_size, tok.eos_id, log=lambda s: print(s, file=sys.stderr))
    wall = time.perf_counter() - t0
    save_checkpoint(model, a.out, tokenizer_dir=a.tokenizer_dir, bos_id=tok.bos_id, eos_id=tok.eos_id)

    questions = load_texts(a.corpus_dir, a.facts_dir, ("question",), entities)
    report = {
        "command": "python " + " ".join(shlex.quote(x) for x in [str(Path(sys.argv[0]))] + list(argv or sys.argv[1:])),
        "config": dataclasses.asdict(cfg),
        "entities": sorted(entities) if entities is not None else "all",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_texts": len(texts), "train_tokens": sum(map(len, seqs)),
        "final_loss": history[-1][1], "loss_curve": history, "wall_seconds": round(wall, 1),
        "torch": torch.__version__, "uniform_perplexity": tok.vocab_size,
        "eval_train": evaluate(model, tok, texts, cfg.max_len, cfg.bf16),
        "eval_questions": evaluate(model, tok, questions, cfg.max_len, cfg.bf16),
    }
    (a.out / "training.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: report[k] for k in ("final_loss", "wall_seconds", "eval_train", "eval_questions")}))


if __name__ == "__main__":
    main()
