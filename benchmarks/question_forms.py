"""Question forms no model here ever trained on: greedy recall from memory against the template forms.

Issue 13 asks for recall on question forms held out of training, within 10 points of the template
forms. Every reader of this project descends from warm-ups that saw all of
examples/corpus_templates.py's question templates, so no template can be held out after the fact;
this benchmark asks instead in forms written for it (NOVEL below), which appear in no training text
of any step, about the same facts of the same held-out entities, and compares:

  template  the questions of examples/reader/facts (two templates per fact kind);
  novel     one new phrasing per fact kind, same facts, same entities;
  blind     three phrasings per fact kind written by someone who saw none of this project's
            phrasings (blind_forms.json), less any that a training phrasing repeats (the composed
            forms of train_memory.py --composed-forms came after NOVEL, not after these).

Both are answered greedily as `m3 generate --kb` answers (density_frontier.answer: the question as
the prompt, the kb's retrieval, 16 new tokens), with the kb's memories and without. A question is
right when the first sentence of the answer contains the fact's value ("892", "Ione Tirnric"):
the novel forms have no answer sentence the model was taught, so the exact-sentence rule of
density_frontier.py would measure style, not recall. The template forms are also scored with
that exact rule, for comparison with the frontier tables. With memory it also reports how often
the references retrieved for the question hold the answer (one of the entity's article whose text
holds the value) and how often the answer is right among those questions: reading apart from
retrieval. Of the wrong answers it counts those holding another of the entity's facts (a fact kind
mistaken for the asked one, not a fact unread) and, of the rest, those holding the entity's own
name (the question echoed), and it lists each set's five weakest forms with the kinds their wrong
answers were taken for; the JSON holds every form's share and those kinds (`taken_for`).

    OMP_NUM_THREADS=1 python benchmarks/question_forms.py --kb world          # the embedded reader
    OMP_NUM_THREADS=1 python benchmarks/question_forms.py --kb world --model examples/reader-half/model
    OMP_NUM_THREADS=1 python benchmarks/question_forms.py --kb world --world-seed 9   # a world no step trained on
    OMP_NUM_THREADS=1 python benchmarks/question_forms.py --kb world --forced   # and with the article in context
    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python benchmarks/question_forms.py --kb world --embedder minilm   # hybrid retrieval
"""

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "examples"))

import make_corpus  # noqa: E402
from corpus_templates import COMPOSED, FREE_FORMS, MORE_QUESTIONS, QUESTIONS  # noqa: E402
from density_frontier import answer, first_sentence, other_world, readers_world, whole_world  # noqa: E402  (same directory)
from train_memory import Evaluator  # noqa: E402
from m3compile.config import CompileConfig, default_model_dir  # noqa: E402
from m3compile.pipeline import compile_kb  # noqa: E402

READER = ROOT / "examples" / "reader"

# One phrasing per fact kind that no template of examples/corpus_templates.py uses (checked in
# main: none equals a template's question). The answer part only marks where the value goes.
NOVEL = {
    "town": {
        "founded": "What year was {n} established? {founded}.",
        "founder": "Whom does {n} call its founder? {founder}.",
        "region": "Which region is {n} part of? {region}.",
        "river": "What river runs past {n}? The {river}.",
        "population": "Roughly how many people does {n} have? About {population}.",
        "export": "What does {n} mostly sell to other towns? {export}.",
        "emblem": "What is shown on the arms of {n}? A {emblem}.",
        "market_day": "Which day of the week is market day in {n}? {market_day}.",
        "rival": "Which town does {n} quarrel with? {rival}.",
    },
    "person": {
        "born": "What year was {n} born in? {born}.",
        "died": "What year did {n} die in? {died}.",
        "birthplace": "What was the home town of {n}? {birthplace}.",
        "occupation": "What trade did {n} follow? {occupation}.",
        "known_for": "What is the best-known work of {n}? The {known_for}.",
        "died_in": "In what town did {n} die? {died_in}.",
        "founder_of": "Which place did {n} found? {founder_of}.",
    },
    "org": {
        "emblem": "What is on the emblem of the {n}? A {emblem}.",
        "kind": "What sort of body is the {n}? {kind}.",
        "seat": "In what town does the {n} sit? {seat}.",
        "founded": "What year was the {n} established? {founded}.",
        "founder": "Whom was the {n} founded by? {founder}.",
        "members": "Roughly how many members has the {n}? About {members}.",
        "specialty": "What is the {n} famous for? {specialty}.",
    },
}


# Forms written for this benchmark by someone who had seen none of the project's templates, the
# training-only phrasings included (corpus_templates.py MORE_QUESTIONS and COMPOSED), nor NOVEL:
# three per fact kind. NOVEL was known when COMPOSED was written, so this is the blind check; a blind
# form that a taught phrasing repeats word for word (27 of 69 with COMPOSED) is left out of it.
BLIND_FILE = Path(__file__).parent / "blind_forms.json"


def taught_forms() -> set[str]:
    """The question part of every phrasing any training text may hold: the templates, the
    training-only MORE_QUESTIONS (benchmarks/train_memory.py --more-forms), every composed
    phrasing (--composed-forms) and every free one (--free-forms)."""
    taught = {t.split("?")[0] for table in (QUESTIONS, MORE_QUESTIONS) for forms in table.values()
              for ts in forms.values() for t in ts}
    taught |= {t.split("?")[0] for type_, kinds in COMPOSED.items() for key in kinds
               for t in make_corpus.composed_forms(type_, key)}
    taught |= {t.split("?")[0] for kinds in FREE_FORMS.values() for ts in kinds.values() for t in ts}
    return taught


def blind_forms(taught: set[str], path: Path = BLIND_FILE) -> tuple[dict, int]:
    """The blind forms of path (default blind_forms.json) less any form that a taught phrasing
    repeats (27 of 69 of blind_forms.json with COMPOSED): (forms, left out)."""
    kept, dropped = {}, 0
    for type_, kinds in json.loads(Path(path).read_text(encoding="utf-8")).items():
        for key, forms in kinds.items():
            ok = [f for f in forms if f.split("?")[0] not in taught]
            dropped += len(forms) - len(ok)
            kept.setdefault(type_, {})[key] = ok
    return kept, dropped


def held_out_entities() -> list:
    """The 40 held-out entities of the readers' world (examples/reader/corpus), as World entities."""
    world, (H, _, _) = readers_world()
    return [e for e in world.entities if e.id in H]


def novel_records(entities, forms=None, tag: str = "novel") -> list[dict]:
    """A record per entity, fact and form of forms (default NOVEL: one form per kind; BLIND: several)."""
    forms = {t: {k: [f] for k, f in kinds.items()} for t, kinds in NOVEL.items()} if forms is None else forms
    out = []
    for e in entities:
        facts, ctx = e.fact_dict, dict(e.ctx)
        for key in sorted(facts):
            for j, form in enumerate(forms[e.type][key]):
                text, spans = make_corpus.render(form, ctx, facts)
                q_end = text.index("? ") + 1
                answer = [s for s in spans if s["key"] == key and s["start"] > q_end]
                assert len(answer) == 1, f"{tag} form {j} of {e.type}.{key} does not hold its answer once"
                out.append({"id": f"{e.id}.{tag}.{key}.{j}", "entity": e.id, "kind": "question",
                            "template": f"{e.type}.{key}.{tag}{j}", "text": text, "question_end": q_end,
                            "facts": answer})
    return out


def holds(text: str, value: str) -> bool:
    """Whether `text` states `value` as a whole: not inside a longer word or number ("45" is not in
    "1450" or "1,450"; a plain substring test counted such answers right)."""
    return re.search(rf"(?<![\w,]){re.escape(value)}(?!\w|,\d)", text) is not None


def retrieved_answer(ev: Evaluator, rec: dict, texts: dict) -> bool:
    """Whether the references retrieved for the question (what `m3 generate` reads for its first
    chunk: the kb's retrieval of the prompt) include one of the entity's article holding the value."""
    prompt = ev.tok.decode(ev.tok.encode(rec["text"][:rec["question_end"]]))
    value, doc = rec["facts"][0]["value"], f"{rec['entity']}.md"
    return any(texts[h.ref_id][0] == doc and holds(texts[h.ref_id][1], value)
               for h in ev.read_hits(prompt))


def ref_texts(ev: Evaluator) -> dict:
    """ref_id -> (doc_id, text) of every reference of the kb."""
    refs = ev.kb.references()
    return dict(zip(refs.column("ref_id").to_pylist(), zip(refs.column("doc_id").to_pylist(),
                                                         refs.column("text").to_pylist())))


def tally(recs: list[dict], heads: list[str], entities: dict, found: list[bool] | None = None) -> dict:
    """A row of the table from each record's answer's first sentence (heads, in recs' order;
    entities: id -> make_corpus.Entity): right by value and by exact sentence, per fact kind and
    per form (the question with the entity's name as {n}), and the shares of the wrong answers
    that hold another of the entity's facts instead (a fact kind mistaken, not a fact unread) and,
    of the rest, the entity's own name (the question echoed); per form, `taken_for`: the kind whose
    value such an answer holds (the first in the entity's facts where it holds several), counted.
    found (with memory): per record, whether retrieval brought an answer-bearing reference."""
    rights, exact_right, other, echo = [], 0, 0, 0
    kinds, forms = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    taken_for = defaultdict(lambda: defaultdict(int))  # form -> the kind whose value a wrong answer holds -> count
    asked = {}
    for r, head in zip(recs, heads, strict=True):
        value, e = r["facts"][0]["value"], entities[r["entity"]]
        ok = holds(head, value)
        rights.append(ok)
        exact_right += head == r["text"][r["question_end"]:].strip()
        held = [k for k, v in e.fact_dict.items() if v != value and holds(head, v)] if not ok else []
        mistaken = bool(held)
        other += mistaken
        if mistaken:
            taken_for[r["template"]][held[0]] += 1
        echo += not ok and not mistaken and e.name in head
        for table, key in ((kinds, r["facts"][0]["key"]), (forms, r["template"])):
            table[key][0] += ok
            table[key][1] += 1
        asked.setdefault(r["template"], r["text"][:r["question_end"]].replace(e.name, "{n}"))
    value_right = sum(rights)
    n, wrong = max(1, len(recs)), len(recs) - value_right
    out = {"questions": len(recs), "value": round(value_right / n, 4), "exact": round(exact_right / n, 4),
           "wrong_other_fact": round(other / max(1, wrong), 4), "wrong_name": round(echo / max(1, wrong), 4),
           "kinds": {k: round(a / b, 4) for k, (a, b) in sorted(kinds.items())},
           "forms": {t: {"asked": asked[t], "questions": b, "value": round(a / b, 4),
                         "taken_for": dict(sorted(taken_for[t].items(), key=lambda kv: (-kv[1], kv[0])))}
                     for t, (a, b) in sorted(forms.items())}}
    if found is not None:  # reading, apart from retrieval: right among the questions whose answer was retrieved
        right_found = sum(f and ok for f, ok in zip(found, rights, strict=True))
        out["retrieved"] = round(sum(found) / n, 4)
        out["right_when_retrieved"] = round(right_found / max(1, sum(found)), 4)
    return out


def _taken(form: dict) -> str:
    """' (answered with its KIND N, KIND N)': the (at most two) kinds whose values most of a form's wrong
    answers held, from tally's `taken_for`; '' where none held another fact."""
    taken = ", ".join(f"{k} {n}" for k, n in list(form["taken_for"].items())[:2])
    return f" (answered with its {taken})" if taken else ""


def score(ev: Evaluator, recs: list[dict], memory: bool, texts: dict, entities: dict) -> dict:
    """texts: ref_texts(ev), for whether retrieval found the answer (with memory); entities: id ->
    Entity of the asked entities. The row of tally() for greedy answers as m3 generate gives them."""
    heads = [first_sentence(answer(ev, r, memory)) for r in recs]
    found = [retrieved_answer(ev, r, texts) for r in recs] if memory else None
    return tally(recs, heads, entities, found)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=default_model_dir(),
                    help="a memory-trained checkpoint (default: the embedded reader), read at its m3-memory.json")
    ap.add_argument("--kb", choices=("held-out", "world"), default="world",
                    help="the 40 held-out articles, or all 2000 articles of the readers' world (default)")
    ap.add_argument("--world-seed", type=int, default=None, metavar="SEED",
                    help="ask another world's held-out entities instead (as density_frontier.py --world-seed: "
                         "9, 10 and 13 are worlds no step trained on)")
    ap.add_argument("--world-entities", type=int, default=8000, help="entities of the --world-seed world")
    ap.add_argument("--blind", type=Path, default=BLIND_FILE,
                    help="the blind forms (default benchmarks/blind_forms.json; blind_forms_2.json is a second set "
                         "by another writer who saw none of the project's phrasings)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--embedder", default=None,
                    help="compile the kb with this embedder (m3 compile --embedder, e.g. minilm): hybrid retrieval")
    ap.add_argument("--min-relative-score", type=float, default=None, metavar="F",
                    help="read only retrieved references scoring at least F of the best (default: the model's "
                         "m3-memory.json, as m3 generate reads)")
    ap.add_argument("--forced", action="store_true",
                    help="also teacher-forced fact accuracy per form set: retrieved memory against the article in "
                         "context (RAG) and nothing: does the model understand the phrasing at all?")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    taught = taught_forms()
    assert not any(NOVEL[t][k].split("?")[0] in taught for t in NOVEL for k in NOVEL[t]), "a novel form is taught"
    blind, dropped = blind_forms(taught, a.blind)
    if dropped:
        print(f"{dropped} blind forms left out: a training phrasing is the same question", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="m3forms-") as tmp:
        if a.world_seed is None:
            entities, facts = held_out_entities(), READER / "facts"
            corpus = whole_world(Path(tmp)) if a.kb == "world" else READER
        else:
            entities, facts, held, whole = other_world(Path(tmp), a.world_entities, a.world_seed)
            corpus = whole if a.kb == "world" else held
        template = [json.loads(line) for line in (facts / "questions.jsonl").read_text().splitlines()]
        assert {r["entity"] for r in template} == {e.id for e in entities}, f"{facts} is not the held-out part of the world"
        novel = novel_records(entities)
        blind_recs = novel_records(entities, blind, "blind")
        t0 = time.perf_counter()
        compile_kb(CompileConfig(corpus=str(corpus / "corpus"), model=str(a.model), embedder=a.embedder),
                   Path(tmp) / "kb")
        ev = Evaluator(Path(tmp) / "kb", a.model, corpus, a.min_relative_score)
        texts = ref_texts(ev)
        by_id = {e.id: e for e in entities}
        rows = {f"{name}, {'memory' if mem else 'none'}": score(ev, recs, mem, texts, by_id)
                for name, recs in (("template", template), ("novel", novel), ("blind", blind_recs))
                for mem in (True, False)}
        forced = {name: {mode: v["question"] for mode, v in ev.table(recs, modes=("sparse", "rag", "none")).items()}
                  for name, recs in (("template", template), ("novel", novel), ("blind", blind_recs))} if a.forced else {}
        seconds = round(time.perf_counter() - t0, 1)
    where = a.kb if a.world_seed is None else f"{a.kb} (world {a.world_seed}, {a.world_entities} entities)"
    floor = f", reading references scoring >= {ev.floor:g} of the best" if ev.floor else ""
    hybrid = f", hybrid retrieval with {a.embedder}" if a.embedder else ""
    print(f"{a.model} on the {where} kb{hybrid} ({seconds} s{floor}); right = the answer's first sentence holds the value")
    print("| forms | memory | questions | right (value) | right (exact sentence) | answer retrieved | right when "
          "retrieved | wrong: another of its facts / its name | weakest kinds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        weakest = ", ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(r["kinds"].items(), key=lambda kv: kv[1])[:3])
        forms, mem = name.split(", ")
        found = (f"{100 * r['retrieved']:.1f} % | {100 * r['right_when_retrieved']:.1f} %" if "retrieved" in r
                 else "- | -")
        print(f"| {forms} | {mem} | {r['questions']} | {100 * r['value']:.1f} % | {100 * r['exact']:.1f} % | {found} "
              f"| {100 * r['wrong_other_fact']:.1f} / {100 * r['wrong_name']:.1f} % | {weakest} |")
    print("\nweakest forms with memory (share right, the question asked of each held-out entity):")
    for name in ("template", "novel", "blind"):
        worst = sorted(rows[f"{name}, memory"]["forms"].items(), key=lambda kv: (kv[1]["value"], kv[0]))[:5]
        print(f"  {name}: " + "; ".join(f"{100 * f['value']:.0f} % {f['asked']!r}" + _taken(f) for _, f in worst))
    if forced:
        print("\nteacher-forced fact accuracy (every token of the value right given the answer so far):")
        print("| forms | retrieved memory | article in context (RAG) | nothing |")
        print("|---|---|---|---|")
        for name, f in forced.items():
            print(f"| {name} | {100 * f['sparse']['fact_acc']:.1f} % | {100 * f['rag']['fact_acc']:.1f} % "
                  f"| {100 * f['none']['fact_acc']:.1f} % |")
    if a.json:
        a.json.write_text(json.dumps({"model": str(a.model), "kb": a.kb, "world_seed": a.world_seed,
                                      "min_relative_score": ev.floor, "embedder": a.embedder, "rows": rows,
                                      "forced": forced}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
