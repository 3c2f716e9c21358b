"""Write the example corpus: a fictional encyclopedia of towns, people and organisations.

A fresh machine has no model and no corpus it may download, so the project writes text no one
else wrote. `generate(n_entities, seed)` builds a `World` of entities whose facts cross-reference
each other consistently (a town's founder is a person whose article says they founded it, in the
same year; people are born in towns that already existed). The writers turn it into:

  corpus/<entity-id>.md       one encyclopedia article per entity (what `m3 compile` reads);
  facts/entities.jsonl        each entity's type, name, article path and fact table;
  facts/restatements.jsonl    the same facts in other words and another order;
  facts/questions.jsonl       one question per fact and template, answer after the "?";
  facts/meta.json             format name/version, generator arguments and counts.

Restatements and questions are what the Memory³ continued training (paper §3.6) reads while the
articles sit in memory: each record carries the entity id, the fact key and the answer's character
span, so a training or evaluation step can measure next-token accuracy on exactly the fact.
Every record also names its template, so held-out sets can be cut by entity or by phrasing.

Deterministic: one seeded `random.Random` drives everything; same arguments give identical bytes.

    python examples/make_corpus.py                    # the committed default (24 entities, seed 0)
    python examples/make_corpus.py --n-entities 600 --corpus-dir /tmp/c --facts-dir /tmp/f
"""

import argparse
import functools
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path

from corpus_templates import (ARTICLE, BEASTS, CODAS, COLOURS, COMPOSED, EXPORTS, FREE_FORMS, GIVEN, LEAD_INS, NOUN_FRAMES,
                              OCCUPATIONS, ONSETS, ORG_KINDS, ORG_WORDS, QUESTIONS, REGION_SUFFIXES, RESTATE,
                              SURNAME_SUFFIXES, TOWN_SUFFIXES, VOWELS, WEEKDAYS, WORK_ADJ, WORK_NOUN)

FORMAT = "m3-example-facts"
FORMAT_VERSION = 1
DEFAULT_N_ENTITIES = 24  # the committed examples/corpus (STYLE: a ~20-document toy corpus)
DEFAULT_SEED = 0
HERE = Path(__file__).resolve().parent
RESTATEMENTS_PER_ENTITY = 2  # restatement paragraphs per entity (each states every fact)


@dataclass(frozen=True)
class Entity:
    id: str  # slug of the name, unique; also the article's file stem
    type: str  # "town", "person" or "org"
    name: str  # display name, e.g. "Veldmoor", "Ilsa Marrowyn", "Heron Printing House"
    facts: tuple  # sorted (key, value) pairs; values are the exact strings the texts contain
    ctx: tuple  # sorted (field, value) pairs that fill non-fact template fields

    @property
    def fact_dict(self) -> dict:
        return dict(self.facts)


@dataclass(frozen=True)
class World:
    seed: int
    entities: tuple  # Entity, in generation order (towns, people, organisations)

    def by_id(self) -> dict:
        return {e.id: e for e in self.entities}


def render(template: str, ctx: dict, facts: dict) -> tuple[str, list[dict]]:
    """Fill a template; return the text and a span record for every fact field in it."""
    out, spans, pos = [], [], 0
    for literal, field, _, _ in string.Formatter().parse(template):
        out.append(literal)
        pos += len(literal)
        if field is None:
            continue
        if field in facts:
            value = facts[field]
            spans.append({"key": field, "value": value, "start": pos, "end": pos + len(value)})
        else:
            value = ctx[field]
        out.append(value)
        pos += len(value)
    return "".join(out), spans


def _slug(name: str) -> str:
    return "-".join(name.lower().split())


class _Names:
    """Draws pronounceable names, never the same string twice."""

    def __init__(self, rng: random.Random):
        self.rng, self.taken = rng, set()

    def draw(self, make) -> str:
        for _ in range(10_000):
            name = make()
            # no tripled letters ("Rorrric") and never a name seen before
            if name not in self.taken and not any(a == b == c for a, b, c in zip(name, name[1:], name[2:])):
                self.taken.add(name)
                return name
        raise AssertionError(("name space exhausted; add name parts", len(self.taken)))

    def stem(self) -> str:
        r = self.rng
        return r.choice(ONSETS) + r.choice(VOWELS) + r.choice(CODAS)

    def town(self):
        return self.draw(lambda: self.stem() + self.rng.choice(TOWN_SUFFIXES))

    def region(self):
        return self.draw(lambda: self.stem() + self.rng.choice(REGION_SUFFIXES))

    def river(self):
        return self.draw(lambda: self.stem() + self.rng.choice(("el", "a", "in", "e", "ow")))

    def surname(self):
        return self.draw(lambda: self.stem() + self.rng.choice(SURNAME_SUFFIXES))

    def work(self):
        # "Amber Ledger", or "Ledger of Tavel" once big worlds run short of adjective-noun pairs
        def make():
            if self.rng.random() < 0.7:
                return f"{self.rng.choice(WORK_ADJ)} {self.rng.choice(WORK_NOUN)}"
            return f"{self.rng.choice(WORK_NOUN)} of {self.stem()}"
        return self.draw(make)

    def org(self, kind: str):
        def make():  # "Heron Academy" or, as often, a made-up word: "Dauvel Academy"
            word = self.rng.choice(ORG_WORDS) if self.rng.random() < 0.5 else self.stem()
            return f"{word} {kind.title()}"
        return self.draw(make)


def _emblem(rng: random.Random) -> str:
    return f"{rng.choice(COLOURS)} {rng.choice(BEASTS)}"


def _commas(n: int) -> str:
    return f"{n:,}"


def generate(n_entities: int = DEFAULT_N_ENTITIES, seed: int = DEFAULT_SEED) -> World:
    """Build a consistent fictional world of `n_entities` articles (about 35% towns, 40% people)."""
    assert n_entities >= 3, n_entities
    rng = random.Random(seed)
    names = _Names(rng)
    n_towns = max(1, round(0.35 * n_entities))
    n_people = max(1, round(0.40 * n_entities))
    n_orgs = n_entities - n_towns - n_people
    assert n_orgs >= 1, (n_entities, n_towns, n_people)
    regions = [names.region() for _ in range(max(2, n_entities // 8))]
    rivers = [names.river() for _ in range(max(2, n_entities // 6))]

    # towns: the first is ancient, so every person can be born in a town that already stood
    towns = []
    for i in range(n_towns):
        founded = rng.randint(880, 1000) if i == 0 else rng.randint(1100, 1650)
        pop = int(round(10 ** rng.uniform(3, 5.4), -2))  # log-uniform, 1,000 to 250,000: towns and cities
        towns.append({"name": names.town(), "region": rng.choice(regions), "river": rng.choice(rivers),
                      "founded": founded, "population": pop, "export": rng.choice(EXPORTS),
                      "emblem": _emblem(rng), "market_day": rng.choice(WEEKDAYS)})
    for t in towns:
        t["rival"] = rng.choice([u["name"] for u in towns if u is not t]) if n_towns > 1 else None
    orgs = []
    for _ in range(n_orgs):
        kind = rng.choice(sorted(ORG_KINDS))
        seat = rng.choice(towns)
        orgs.append({"name": names.org(kind), "kind": kind, "seat": seat["name"],
                     # 1100 or later, so its founder, too, is born after the ancient town stood
                     "founded": min(1850, max(1100, seat["founded"] + rng.randint(20, 300))),
                     "members": rng.randint(12, 900), "specialty": rng.choice(ORG_KINDS[kind]),
                     "emblem": _emblem(rng)})

    # founders: people with articles found one thing each; the rest (and the ancient town) get
    # founders who are only named, so small worlds still have a founder for everything
    people = [{"gender": rng.choice(("she", "he")), "surname": names.surname()} for _ in range(n_people)]
    for p in people:
        p["name"] = f"{rng.choice(GIVEN[p['gender']])} {p['surname']}"
        names.taken.add(p["name"])
    foundable = towns[1:] + orgs
    rng.shuffle(foundable)
    for thing, p in zip(foundable, people):
        thing["founder"] = p["name"]
        p["founded"] = thing
        p["born"] = thing["founded"] - rng.randint(22, 55)
        p["died"] = thing["founded"] + rng.randint(2, 40)
    for thing in [towns[0]] + foundable[len(people):]:
        g = rng.choice(("she", "he"))
        thing["founder"] = f"{rng.choice(GIVEN[g])} {names.surname()}"
    for p in people:
        if "born" not in p:
            p["born"] = rng.randint(1080, 1800)
            p["died"] = p["born"] + rng.randint(30, 88)
        older = [t["name"] for t in towns if t["founded"] < p["born"]]
        p["birthplace"] = rng.choice(older)
        p["died_in"] = rng.choice([t["name"] for t in towns if t["founded"] < p["died"]])
        p["occupation"] = rng.choice(OCCUPATIONS)
        p["known_for"] = names.work()

    entities = []
    for t in towns:
        facts = {k: str(t[k]) for k in ("region", "river", "founded", "founder", "export", "emblem", "market_day")}
        facts["population"] = _commas(t["population"])
        if t["rival"]:
            facts["rival"] = t["rival"]
        noun = "city" if t["population"] >= 20_000 else "town"
        entities.append(_entity("town", t["name"], facts, {"noun": noun}))
    for p in people:
        facts = {k: str(p[k]) for k in ("born", "died", "birthplace", "died_in", "occupation", "known_for")}
        ctx = {"pron": p["gender"], "Pron": p["gender"].title(), "poss": "her" if p["gender"] == "she" else "his",
               "short": p["surname"]}
        ctx["Poss"] = ctx["poss"].title()
        if "founded" in p:
            thing = p["founded"]
            facts["founder_of"] = thing["name"]
            is_org = "kind" in thing
            ctx.update(founded_year=str(thing["founded"]), founded_the="the " if is_org else "",
                       founded_The="The " if is_org else "")
        entities.append(_entity("person", p["name"], facts, ctx))
    for o in orgs:
        facts = {k: str(o[k]) for k in ("kind", "seat", "founded", "founder", "specialty", "emblem")}
        facts["members"] = str(o["members"])
        entities.append(_entity("org", o["name"], facts, {}))
    return World(seed=seed, entities=tuple(entities))


def _entity(type_: str, name: str, facts: dict, ctx: dict) -> Entity:
    ctx = dict(ctx, n=name, N=name[0].upper() + name[1:])
    noun = facts.get("occupation") or facts.get("kind")
    if noun:  # the indefinite article before the person's trade or the organisation's kind
        ctx["a"] = "an" if noun[0] in "aeiou" else "a"
        ctx["A"] = ctx["a"].title()
    return Entity(id=_slug(name), type=type_, name=name, facts=tuple(sorted(facts.items())),
                  ctx=tuple(sorted(ctx.items())))


def _usable(template: str, facts: dict, ctx: dict) -> bool:
    fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    return all(f in facts or f in ctx for f in fields)


def article(entity: Entity, rng: random.Random) -> tuple[str, list[dict]]:
    """Markdown article (title + one paragraph of facts + cross-references) and its fact spans."""
    facts, ctx = entity.fact_dict, dict(entity.ctx)
    title = f"# {entity.name}\n\n"
    sentences = []
    for alternatives in ARTICLE[entity.type]:
        usable = [a for a in alternatives if _usable(a, facts, ctx)]
        if usable:
            sentences.append(rng.choice(usable))
    text, spans = title, []
    for s in sentences:
        piece, sp = render(s, ctx, facts)
        if text != title:
            text += " "
        spans += [dict(x, start=x["start"] + len(text), end=x["end"] + len(text)) for x in sp]
        text += piece
    assert {s["key"] for s in spans} == set(facts), (entity.id, sorted(facts), spans)
    return text + "\n", spans


def _see_also(world: World) -> dict:
    # cross-references only other articles can tell: who was born in a town, what is seated there
    notes = {e.id: [] for e in world.entities}
    by_name = {e.name: e for e in world.entities}
    for e in world.entities:
        f = e.fact_dict
        if e.type == "person" and f["birthplace"] in by_name:
            notes[by_name[f["birthplace"]].id].append(("born", e.name))
        if e.type == "org":
            notes[by_name[f["seat"]].id].append(("seat", e.name))
    return notes


def _see_also_text(items: list) -> str:
    born = [n for k, n in items if k == "born"]
    seat = [n for k, n in items if k == "seat"]
    out = ""
    if born:
        out += "\n\nPeople born here include " + _join(born) + "."
    if seat:
        out += "\n\nIt is the seat of " + _join(["the " + n for n in seat]) + "."
    return out


def _join(xs: list) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def restatements(entity: Entity, rng: random.Random, n: int = RESTATEMENTS_PER_ENTITY) -> list[dict]:
    """`n` paragraphs that restate every fact in other words, each in a fresh order."""
    facts, ctx = entity.fact_dict, dict(entity.ctx)
    pool = [t for t in RESTATE[entity.type] if _usable(t, facts, ctx)]
    records = []
    for i in range(n):
        order = pool[:]
        rng.shuffle(order)
        # keep the first template for each fact key, so a paragraph states each fact once
        chosen, covered = [], set()
        for t in order:
            keys = {f for _, f, _, _ in string.Formatter().parse(t) if f in facts}
            if keys - covered:
                chosen.append(t)
                covered |= keys
        text, spans = "", []
        for t in chosen:
            # the first sentence names the entity in full, later ones may use the surname
            piece, sp = render(t, ctx if text else dict(ctx, short=ctx["n"]), facts)
            if text:
                text += " "
            spans += [dict(x, start=x["start"] + len(text), end=x["end"] + len(text)) for x in sp]
            text += piece
        records.append({"id": f"{entity.id}.r{i}", "entity": entity.id, "kind": "restatement",
                        "template": f"{entity.type}.restate", "text": text, "facts": spans})
    return records


def questions(entity: Entity, forms: dict | None = None, tag: str = "") -> list[dict]:
    """Every question template for every fact, the answer after "? ".

    forms: the templates (default QUESTIONS; corpus_templates.MORE_QUESTIONS for training-only
    phrasings, with tag "x": ids NAME.q.KEY.xJ, so that they never collide with the questions').
    """
    facts, ctx = entity.fact_dict, dict(entity.ctx)
    forms = QUESTIONS if forms is None else forms
    records = []
    for key in sorted(facts):
        for j, t in enumerate(forms[entity.type][key]):
            text, spans = render(t, ctx, facts)
            q_end = text.index("? ") + 1
            answer = [s for s in spans if s["key"] == key and s["start"] > q_end]
            assert len(answer) == 1, (entity.id, key, text)
            records.append({"id": f"{entity.id}.q.{key}.{tag}{j}", "entity": entity.id, "kind": "question",
                            "template": f"{entity.type}.{key}.{tag or 'q'}{j}", "text": text, "question_end": q_end,
                            "facts": answer})
    return records


@functools.cache  # drawn from once per entity and fact: make_world asks for the same ~500 forms ~10^5 times
def composed_forms(type_: str, key: str, part: str | None = None) -> tuple[str, ...]:
    """Every composed phrasing of one fact kind (corpus_templates.COMPOSED) as question templates
    like QUESTIONS's, in a fixed order: lead-in x (noun frame x noun, or verb phrase) x answer.
    part: "nouns" or "verbs" for those asked by a noun or by a verb phrase alone (default both)."""
    spec = COMPOSED[type_][key]
    subject = "the {n}" if type_ == "org" else "{n}"
    asks = []
    if part in (None, "nouns"):
        asks += [f.replace("{rel}", noun) for noun in spec["nouns"] for f in NOUN_FRAMES]
    if part in (None, "verbs"):
        asks += [v + "?" for v in spec["verbs"]]
    out = []
    for lead in LEAD_INS:
        for ask in asks:
            ask = ask.replace("{s}", subject)
            q = lead + (ask[0].lower() + ask[1:] if lead else ask)
            out += [f"{q} {answer}" for answer in spec["answers"]]
    return tuple(out)


def composed_questions(entity: Entity, per_fact: int, rng: random.Random) -> list[dict]:
    """per_fact composed phrasings of each of the entity's facts, drawn with rng, half of them asked
    by a noun and half by a verb phrase (there are ~8x more of the former). Training only
    (benchmarks/train_memory.py --composed-forms); ids NAME.q.KEY.cJ."""
    forms = {}
    for key in sorted(entity.fact_dict):
        nouns, verbs = composed_forms(entity.type, key, "nouns"), composed_forms(entity.type, key, "verbs")
        forms[key] = rng.sample(nouns, (per_fact + 1) // 2) + rng.sample(verbs, per_fact // 2)
    return questions(entity, {entity.type: forms}, tag="c")


def free_questions(entity: Entity, per_fact: int, rng: random.Random) -> list[dict]:
    """per_fact of corpus_templates.FREE_FORMS's phrasings of each of the entity's facts, drawn with
    rng. Training only (benchmarks/train_memory.py --free-forms); ids NAME.q.KEY.fJ."""
    forms = {key: rng.sample(FREE_FORMS[entity.type][key], per_fact) for key in sorted(entity.fact_dict)}
    return questions(entity, {entity.type: forms}, tag="f")


def _jsonl(records) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)


def split_world(ids: list[str], held_out: float, memory_only: float, seed: int) -> tuple[set, set, set]:
    """Split entity ids three ways for the memory-training experiment (benchmarks/train_memory.py):
    held-out H, memory-only A and known W, by a seeded shuffle of the sorted ids."""
    rng = random.Random(f"{seed}/split")
    ids = sorted(ids)
    rng.shuffle(ids)
    nh, na = round(held_out * len(ids)), round(memory_only * len(ids))
    return set(ids[:nh]), set(ids[nh:nh + na]), set(ids[nh + na:])


def write_corpus(world: World, out_dir: Path, ids=None) -> list[Path]:
    """Write one article per entity (all, or those in `ids`); remove other `.md` files there."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{world.seed}/articles")
    notes = _see_also(world)
    written = []
    for e in world.entities:
        text, _ = article(e, rng)  # drawn for every entity, so a subset gets the same wording
        if ids is not None and e.id not in ids:
            continue
        path = out_dir / f"{e.id}.md"
        path.write_text(text.rstrip("\n") + _see_also_text(notes[e.id]) + "\n", encoding="utf-8")
        written.append(path)
    for stale in sorted(set(out_dir.glob("*.md")) - set(written)):
        stale.unlink()
    return written


def write_facts(world: World, out_dir: Path, ids=None, n_restatements: int = RESTATEMENTS_PER_ENTITY,
                corpus_name: str = "corpus") -> dict:
    """Write entities/restatements/questions JSONL and meta.json (all entities, or those in `ids`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{world.seed}/restatements")
    ents, rest, ques = [], [], []
    for e in world.entities:
        r = restatements(e, rng, n_restatements)  # drawn for every entity, as in write_corpus
        if ids is not None and e.id not in ids:
            continue
        ents.append({"id": e.id, "type": e.type, "name": e.name, "article": f"{corpus_name}/{e.id}.md",
                     "facts": e.fact_dict})
        rest += r
        ques += questions(e)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "generator": "examples/make_corpus.py",
            "n_entities": len(world.entities), "seed": world.seed, "subset": ids is not None,
            "restatements_per_entity": n_restatements,
            "counts": {"entities": len(ents), "restatements": len(rest), "questions": len(ques)},
            "spans": "facts[].start/end are character offsets into text; text[start:end] == value"}
    for name, recs in (("entities", ents), ("restatements", rest), ("questions", ques)):
        (out_dir / f"{name}.jsonl").write_text(_jsonl(recs), encoding="utf-8")
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-entities", type=int, default=DEFAULT_N_ENTITIES)
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--restatements", type=int, default=RESTATEMENTS_PER_ENTITY, help="per entity")
    ap.add_argument("--corpus-dir", type=Path, default=HERE / "corpus")
    ap.add_argument("--facts-dir", type=Path, default=HERE / "facts")
    a = ap.parse_args(argv)
    world = generate(a.n_entities, a.seed)
    files = write_corpus(world, a.corpus_dir)
    meta = write_facts(world, a.facts_dir, n_restatements=a.restatements)
    print(f"wrote {len(files)} articles to {a.corpus_dir} and {meta['counts']} to {a.facts_dir}")


if __name__ == "__main__":
    main()
