"""The words of the example encyclopedia: name parts, value lists and sentence templates.

Pure data, used by make_corpus.py (which holds the logic).

Articles, restatements and questions word the facts differently, so a model that answers a
question from an article in memory has to map one phrasing onto another, not copy a sentence.
"""

import json
from pathlib import Path

# name parts; names are onset + vowel + coda (+ suffix), checked unique across the whole world
ONSETS = ("B", "Br", "C", "Cr", "D", "Dr", "F", "G", "Gr", "H", "K", "L", "M", "N", "P", "R",
          "S", "St", "T", "Th", "V", "W", "Y", "Z")
VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia")
CODAS = ("l", "n", "r", "rn", "ld", "st", "sk", "v", "th", "m", "nd", "rr")
TOWN_SUFFIXES = ("moor", "ford", "hollow", "wick", "mere", "gate", "stead", "holm", "by", "reach",
                 "haven", "crest", "dale", "brook", "fell", "port")
REGION_SUFFIXES = ("vale", "march", "lands", "shire", "fen")
SURNAME_SUFFIXES = ("ric", "wyn", "ard", "ell", "ow", "ane", "ith", "en", "ley", "ton")
GIVEN = {
    "she": ("Ilsa", "Orla", "Maren", "Tamsin", "Brisa", "Edda", "Liesel", "Nerys", "Sabine", "Yara",
            "Corra", "Elin", "Frida", "Greta", "Hanne", "Ione", "Juna", "Katrin", "Mira", "Perrin"),
    "he": ("Aldo", "Bram", "Casimir", "Dorian", "Emrys", "Fennick", "Gideon", "Halvard", "Ivo",
           "Jory", "Kaspar", "Lucan", "Matthis", "Niall", "Osric", "Piet", "Rurik", "Soren", "Tobin", "Ulric"),
}
OCCUPATIONS = ("cartographer", "shipwright", "astronomer", "physician", "merchant", "poet", "architect",
               "clockmaker", "botanist", "printer", "engineer", "composer", "glassblower", "historian")
WORK_ADJ = ("Amber", "Salt", "Winter", "Copper", "Tidal", "Silent", "Northern", "Lantern", "Iron",
            "Green", "Hollow", "Golden", "Lesser", "Ninefold", "Weathered", "Scarlet")
WORK_NOUN = ("Ledger", "Atlas", "Almanac", "Charts", "Psalter", "Codex", "Treatise", "Chronicle",
             "Herbal", "Canticles", "Survey", "Compass", "Register", "Letters")
EXPORTS = ("amber", "salt", "wool", "copper", "glassware", "dyed linen", "barley", "tin", "honey",
           "rope", "paper", "clocks", "cheese", "timber", "slate", "indigo", "pewter", "cider", "lace")
COLOURS = ("silver", "red", "green", "black", "golden", "blue", "white")
BEASTS = ("heron", "stag", "boar", "tower", "key", "ship", "wolf", "otter", "fox", "bell", "wheel")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")
ORG_WORDS = ("Amber", "Heron", "Lantern", "Copper", "Juniper", "Saltmarsh", "Kestrel", "Thistle",
             "Meridian", "Ivory", "Cobalt", "Willow", "Granite", "Falcon", "Marigold", "Hawthorn",
             "Ember", "Silver", "Raven", "Oak", "Larch", "Otter", "Bramble", "Quill")
# org kind -> what such a body is known for
ORG_KINDS = {
    "guild": ("bell casting", "glass beads", "river charts", "fine locks", "woven banners"),
    "trading company": ("spice fleets", "salt caravans", "fur trade", "wool contracts"),
    "academy": ("lectures on optics", "school of rhetoric", "medical library", "debates"),
    "observatory": ("star catalogues", "comet records", "eclipse tables", "great telescope"),
    "bank": ("silver notes", "loans to shipbuilders", "vaulted cellars", "bills of exchange"),
    "printing house": ("pocket almanacs", "illustrated herbals", "maps", "cheap broadsheets"),
    "shipyard": ("river barges", "fast cutters", "ocean carracks", "dredgers"),
}

# Templates. {n}/{N} is the entity's name in running text / at a sentence start, {short} a
# person's surname, {pron}/{Pron}/{poss} pronouns, {noun} "town"/"city", {founded_the} "the "
# before an organisation's name. Every other field is a fact key, and its span is recorded.
# An article line is a list of alternatives; each alternative covers the same fact keys.
ARTICLE = {
    "town": [
        ["{N} is a {noun} in {region}, on the banks of the River {river}.",
         "{N} is a {noun} on the River {river}, in the region of {region}."],
        ["It was founded in {founded} by {founder}.", "{founder} founded the {noun} in {founded}."],
        ["{N} has a population of about {population}.", "About {population} people live in {N}."],
        ["The {noun} is best known for its {export}.", "Its chief export is {export}."],
        ["Its old rival is {rival}.", "For centuries {N} has quarrelled with {rival}."],
        ["The arms of {n} show a {emblem}, and its market is held on {market_day}.",
         "Market day in {n} is {market_day}; the {noun} arms show a {emblem}."],
    ],
    "person": [
        ["{N} ({born}\u2013{died}) was {a} {occupation} from {birthplace}.",
         "{N} was {a} {occupation} born in {birthplace} in {born}; {pron} died in {died}."],
        ["In {founded_year} {pron} founded {founded_the}{founder_of}."],
        ["{Pron} died in {died_in}.", "{Pron} spent {poss} last years in {died_in}."],
        ["{Pron} is remembered for the {known_for}.", "{Poss} best-known work is the {known_for}."],
    ],
    "org": [
        ["The {n} is {a} {kind} seated in {seat}.", "The {n} is {a} {kind} with its seat in {seat}."],
        ["It was founded in {founded} by {founder}.", "{founder} founded it in {founded}."],
        ["It has about {members} members.", "The {kind} counts about {members} members."],
        ["It is known for its {specialty}.", "Its fame rests on its {specialty}."],
        ["Its emblem is a {emblem}.", "The {kind} bears a {emblem} on its seal."],
    ],
}
RESTATE = {
    "town": ["{founder} established {n} in the year {founded}.", "{N} lies in {region}.",
             "The River {river} flows through {n}.", "Roughly {population} inhabitants call {n} home.",
             "Traders know {n} above all for {export}.", "{rival} has long competed with {n}.",
             "In {founded}, {founder} laid the first stones of {n}.", "The {noun} of {n} belongs to {region}.",
             "A {emblem} is painted on the gates of {n}.",
             "Each {market_day} the square of {n} fills with stalls."],
    "person": ["{short} came into the world in {born} at {birthplace}.", "{short} worked as {a} {occupation}.",
               "{short} died in the year {died}.", "The {known_for} was written by {short}.",
               "It was {short} who founded {founded_the}{founder_of}.", "By trade {short} was {a} {occupation}.",
               "{short} passed away in {died_in}."],
    "org": ["{founder} set up the {n} in {founded}.", "The seat of the {n} is {seat}.",
            "Some {members} members belong to the {n}.", "The {n} is {a} {kind}.",
            "People remember the {n} for its {specialty}.", "In {founded} the {n} was established.",
            "The seal of the {n} carries a {emblem}."],
}
QUESTIONS = {
    "town": {
        "founded": ["In which year was {n} founded? {founded}.", "When was {n} founded? In {founded}."],
        "founder": ["Who founded {n}? {founder}.", "Who was the founder of {n}? It was {founder}."],
        "region": ["In which region is {n}? In {region}.", "Where does {n} lie? In {region}."],
        "river": ["On which river does {n} lie? The River {river}.",
                  "Which river flows through {n}? The {river}."],
        "population": ["How many people live in {n}? About {population}.",
                       "What is the population of {n}? About {population}."],
        "export": ["What is the chief export of {n}? Mainly {export}.",
                   "What is {n} known for? For its {export}."],
        "emblem": ["What do the arms of {n} show? A {emblem}.", "Which emblem does {n} bear? A {emblem}."],
        "market_day": ["On which day is market held in {n}? On {market_day}.",
                       "When is market day in {n}? On {market_day}."],
        "rival": ["Which town is the old rival of {n}? {rival}.",
                  "With whom has {n} long quarrelled? With {rival}."],
    },
    "person": {
        "born": ["In which year was {n} born? {born}.", "When was {n} born? In {born}."],
        "died": ["In which year did {n} die? {died}.", "When did {n} die? In {died}."],
        "birthplace": ["Where was {n} born? In {birthplace}.", "Which town was {n} from? From {birthplace}."],
        "occupation": ["What was {n}'s trade? {A} {occupation}.",
                       "What did {n} work as? As {a} {occupation}."],
        "known_for": ["Which work is {n} remembered for? The {known_for}.",
                      "Which work did {n} write? The {known_for}."],
        "died_in": ["Where did {n} die? In {died_in}.",
                    "In which town did {n} spend {poss} last years? In {died_in}."],
        "founder_of": ["What did {n} found? {founded_The}{founder_of}.",
                       "What was founded by {n}? {founded_The}{founder_of}."],
    },
    "org": {
        "emblem": ["What is the emblem of the {n}? A {emblem}.",
                   "What does the seal of the {n} carry? A {emblem}."],
        "kind": ["What kind of body is the {n}? {A} {kind}.", "What is the {n}? It is {a} {kind}."],
        "seat": ["Where is the {n} seated? In {seat}.", "Which town is the seat of the {n}? {seat}."],
        "founded": ["In which year was the {n} founded? {founded}.",
                    "When was the {n} founded? In {founded}."],
        "founder": ["Who founded the {n}? {founder}.", "Who was the founder of the {n}? It was {founder}."],
        "members": ["How many members does the {n} have? About {members}.",
                    "How large is the {n}? It has about {members} members."],
        "specialty": ["What is the {n} known for? Its {specialty}.",
                      "For what is the {n} famous? For its {specialty}."],
    },
}

# More phrasings of every question, for memory training only (benchmarks/train_memory.py
# --more-forms): never in examples/*/facts, never asked by the frontier. Two forms per kind taught
# the 1M-parameter readers to map a question to a fact kind by its template's words, so that a
# new phrasing of a river question got an organisation for an answer (examples/README.md, question
# forms). These were written without the held-out phrasings of benchmarks/question_forms.py's
# NOVEL in view of their wording: main there checks that none of them is one of these.
MORE_QUESTIONS = {
    "town": {
        "founded": ["Since which year has {n} existed? Since {founded}.", "What is the founding date of {n}? {founded}.",
                    "{N} was founded in which year? In {founded}.", "How old is {n}? It was founded in {founded}."],
        "founder": ["Which person founded {n}? {founder}.", "By whom was {n} founded? By {founder}.",
                    "{N} was founded by whom? By {founder}.", "Who built the first houses of {n}? {founder}."],
        "region": ["In what region does {n} lie? In {region}.", "{N} belongs to which region? To {region}.",
                   "What region holds {n}? {region}.", "Where is {n} to be found? In {region}."],
        "river": ["What is the river of {n} called? The {river}.", "{N} stands on which river? The {river}.",
                  "Which river is {n} built on? The River {river}.",
                  "What is the name of the river at {n}? The {river}."],
        "population": ["How big is {n}? About {population} people live there.",
                       "{N} has how many inhabitants? About {population}.",
                       "How many inhabitants does {n} count? About {population}.",
                       "What is the size of {n}? About {population} people."],
        "export": ["What does {n} export? Mainly {export}.", "Which goods is {n} famous for? For its {export}.",
                   "What do traders buy in {n}? Its {export}.", "What is the main trade good of {n}? {export}."],
        "emblem": ["What is the emblem of {n}? A {emblem}.", "What do the town arms of {n} carry? A {emblem}.",
                   "{N} bears which emblem? A {emblem}.", "Which sign does {n} bear on its arms? A {emblem}."],
        "market_day": ["On what day does {n} hold its market? On {market_day}.",
                       "When do the stalls open in {n}? On {market_day}.",
                       "{N} holds its market on which day? On {market_day}.",
                       "Which day brings the market to {n}? {market_day}."],
        "rival": ["Who is the rival of {n}? {rival}.", "Which town competes with {n}? {rival}.",
                  "{N} has long been at odds with which town? With {rival}.", "What is the old enemy of {n}? {rival}."],
    },
    "person": {
        "born": ["When did {n} come into the world? In {born}.", "What is the birth year of {n}? {born}.",
                 "{N} was born in which year? In {born}.", "How long ago was {n} born? In {born}."],
        "died": ["What is the year of {n}'s death? {died}.", "When did {n} pass away? In {died}.",
                 "{N} died in which year? In {died}.", "In what year did {n} pass away? {died}."],
        "birthplace": ["Which town was {n} born in? {birthplace}.", "What is the birthplace of {n}? {birthplace}.",
                       "{N} was born where? In {birthplace}.", "Where did {n} come from? From {birthplace}."],
        "occupation": ["What was {n}'s job? {A} {occupation}.", "What profession did {n} have? {A} {occupation}.",
                       "How did {n} earn a living? As {a} {occupation}.", "{N} worked in which craft? As {a} {occupation}."],
        "known_for": ["What is {n} known for? The {known_for}.", "Which book made {n} famous? The {known_for}.",
                      "What did {n} write? The {known_for}.", "For which work is {n} famous? For the {known_for}."],
        "died_in": ["Which town did {n} die in? {died_in}.", "Where did {n} pass away? In {died_in}.",
                    "{N} died in which town? In {died_in}.", "Where did {n} end {poss} days? In {died_in}."],
        "founder_of": ["What was {n} the founder of? {founded_The}{founder_of}.",
                       "{N} founded what? {founded_The}{founder_of}.",
                       "What did {n} set up? {founded_The}{founder_of}.",
                       "Which foundation is owed to {n}? {founded_The}{founder_of}."],
    },
    "org": {
        "emblem": ["What emblem does the {n} use? A {emblem}.", "What sign does the {n} bear? A {emblem}.",
                   "The {n} has which emblem? A {emblem}.", "What does the {n} show on its seal? A {emblem}."],
        "kind": ["How would you describe the {n}? As {a} {kind}.", "The {n} is what kind of body? {A} {kind}.",
                 "What is the {n}, a company or a school? It is {a} {kind}.",
                 "Which sort of institution is the {n}? {A} {kind}."],
        "seat": ["Where does the {n} have its seat? In {seat}.", "Where is the {n} based? In {seat}.",
                 "The {n} is seated in which town? In {seat}.", "Where is the home of the {n}? In {seat}."],
        "founded": ["What is the founding year of the {n}? {founded}.", "Since when has the {n} existed? Since {founded}.",
                    "The {n} was founded in which year? In {founded}.", "How old is the {n}? It was founded in {founded}."],
        "founder": ["Which person founded the {n}? {founder}.", "Who set up the {n}? {founder}.",
                    "The {n} was founded by whom? By {founder}.", "Who started the {n}? {founder}."],
        "members": ["How many people belong to the {n}? About {members}.",
                    "What is the size of the {n}? About {members} members.",
                    "The {n} has how many members? About {members}.", "How many members are in the {n}? About {members}."],
        "specialty": ["For what is the {n} remembered? For its {specialty}.", "What made the {n} famous? Its {specialty}.",
                      "What is the {n} noted for? Its {specialty}.", "What is special about the {n}? Its {specialty}."],
    },
}

# Composed phrasings, for memory training only (benchmarks/train_memory.py --composed-forms K):
# every question of a fact kind is put together from a relation (a noun phrase, asked as "What is
# the <noun> of X?" and its variants in NOUN_FRAMES, or a question word with a verb phrase), an
# optional lead-in, and an answer in the kind's forms, so that the readers meet hundreds of ways
# to ask for a kind and none often enough to learn it by its wording (make_corpus.composed_forms
# lists them all). {s} is the subject: the name, "the {n}" for an organisation. Written to be broad, after the held-out forms of benchmarks/question_forms.py
# (NOVEL) were known; benchmarks/blind_forms.json, written by someone who saw none of these, is the
# blind check. Never in examples/*/facts, never asked by the frontier.
LEAD_INS = ("", "Tell me, ", "Quick question: ", "I wonder, ", "Do you remember: ", "One more thing: ")
NOUN_FRAMES = ("What is the {rel} of {s}?", "What's the {rel} of {s}?", "Do you know the {rel} of {s}?",
               "Which is the {rel} of {s}?", "Can you name the {rel} of {s}?", "What is {s}'s {rel}?",
               "Could you tell me the {rel} of {s}?", "And the {rel} of {s}?")
COMPOSED = {
    "town": {
        "founded": {"nouns": ("founding year", "year of founding", "year of foundation", "founding date",
                              "date of founding"),
                    "verbs": ("When was {s} established", "In which year was {s} built", "When did {s} come into being",
                              "In what year was {s} first settled", "Since when has {s} existed",
                              "When was {s} set up", "In which year did {s} begin"),
                    "answers": ("{founded}.", "In {founded}.")},
        "founder": {"nouns": ("founder", "first founder", "original founder", "builder", "first settler"),
                    "verbs": ("Who established {s}", "Who built {s}", "Who started {s}", "Who set up {s}",
                              "Which person established {s}", "Who is credited with founding {s}",
                              "Who laid the first stones of {s}", "Who created {s}"),
                    "answers": ("{founder}.", "It was {founder}.")},
        "region": {"nouns": ("region", "province", "home region", "district", "surrounding region"),
                   "verbs": ("Where is {s} located", "Which region does {s} belong to", "In what region can {s} be found",
                             "Which region contains {s}", "Where is {s} situated", "Which province is {s} in",
                             "In which part of the country is {s}"),
                   "answers": ("{region}.", "In {region}.")},
        "river": {"nouns": ("river", "local river", "main river", "nearest river"),
                  "verbs": ("On which river is {s} built", "Which river flows past {s}", "What river passes through {s}",
                            "Which river does {s} stand on", "On what river does {s} sit", "Which river crosses {s}",
                            "What river is {s} on", "By which river does {s} lie"),
                  "answers": ("The {river}.", "The River {river}.")},
        "population": {"nouns": ("population", "number of inhabitants", "number of residents", "head count",
                                 "size of the population"),
                       "verbs": ("How many residents does {s} have", "How large is the population of {s}",
                                 "How many souls live in {s}", "How populous is {s}", "How many people call {s} home",
                                 "How many people dwell in {s}", "How many citizens does {s} have"),
                       "answers": ("About {population}.", "About {population} people.")},
        "export": {"nouns": ("main export", "principal trade good", "best-known product", "most famous ware",
                             "leading export", "main trade", "staple good", "chief product"),
                   "verbs": ("What does {s} sell abroad", "What goods does {s} trade in", "What does {s} produce for trade",
                             "What do merchants buy in {s}", "Which goods does {s} ship to market",
                             "What does {s} sell to merchants", "What does {s} trade", "What does {s} make its money from",
                             "What does {s} send abroad"),
                   "answers": ("Mainly {export}.", "{export}.", "Its {export}.")},
        "emblem": {"nouns": ("coat of arms", "heraldic sign", "arms", "crest", "symbol", "badge", "device"),
                   "verbs": ("Which emblem does {s} use", "What is painted on the gates of {s}",
                             "What appears on the arms of {s}", "What does the crest of {s} show",
                             "Which symbol does {s} bear", "What is pictured in the arms of {s}",
                             "What animal or sign stands for {s}"),
                   "answers": ("A {emblem}.",)},
        "market_day": {"nouns": ("market day", "day of the market", "weekly market day", "trading day"),
                       "verbs": ("On which day is the market held in {s}", "What day does {s} hold its market",
                                 "When is the weekly market in {s}", "On what day do traders come to {s}",
                                 "On which weekday do the stalls fill the square of {s}",
                                 "When do farmers sell at the market of {s}", "On what day can one shop at the market of {s}"),
                       "answers": ("On {market_day}.", "{market_day}.")},
        "rival": {"nouns": ("old rival", "rival", "old enemy", "great rival", "rival town", "old foe"),
                  "verbs": ("Which town competes with {s}", "Who is {s} at odds with", "Which town has long quarrelled with {s}",
                            "With which town does {s} feud", "Which place does {s} compete against",
                            "Which town is the enemy of {s}", "Which neighbour does {s} dislike"),
                  "answers": ("{rival}.", "It is {rival}.")},
    },
    "person": {
        "born": {"nouns": ("birth year", "year of birth", "date of birth"),
                 "verbs": ("In which year was {s} born", "In what year did {s} come into the world",
                           "When did {s} first see the light of day", "In which year did {s}'s life begin",
                           "When was {s} born into the world", "How long ago was {s} born"),
                 "answers": ("{born}.", "In {born}.")},
        "died": {"nouns": ("year of death", "death year", "date of death"),
                 "verbs": ("In which year did {s} pass away", "When did {s}'s life end", "In what year did {s} die",
                           "When was {s}'s death", "When did {s} breathe {poss} last", "When was {s} buried"),
                 "answers": ("{died}.", "In {died}.")},
        "birthplace": {"nouns": ("birthplace", "place of birth", "native town", "town of birth", "hometown"),
                       "verbs": ("In which town was {s} born", "Which town did {s} come from", "Where does {s} come from",
                                 "Which town was {s} a native of", "Where was {s} from originally",
                                 "In what town did {s} come into the world", "Where was {s} born"),
                       "answers": ("{birthplace}.", "It was {birthplace}.")},
        "occupation": {"nouns": ("trade", "profession", "occupation", "craft", "job", "line of work", "calling"),
                       "verbs": ("What did {s} do for a living", "What was {s} by trade", "How did {s} make a living",
                                 "What kind of work did {s} do", "Which craft did {s} practise",
                                 "What was {s}'s work", "What was {s} by profession"),
                       "answers": ("{A} {occupation}.", "{Pron} was {a} {occupation}.")},
        "known_for": {"nouns": ("most famous work", "masterpiece", "most famous book", "major work",
                                "chief work"),
                      "verbs": ("What is {s} remembered for", "Which book did {s} write", "Which work made {s} famous",
                                "What is {s} best known for", "Which work is {s} known for", "What did {s} leave behind",
                                "Which book is by {s}", "What did {s} publish"),
                      "answers": ("The {known_for}.",)},
        "died_in": {"nouns": ("place of death", "last home", "town of death", "final home"),
                    "verbs": ("In which town did {s} pass away", "Where did {s} spend {poss} last years",
                              "Where did {s} end {poss} life", "In which town did {s} die", "Where did {s} live at the end",
                              "Where was {s} when {pron} died", "Which town saw the death of {s}"),
                    "answers": ("In {died_in}.", "{died_in}.")},
        "founder_of": {"nouns": ("foundation", "greatest foundation", "best-known foundation"),
                       "verbs": ("What did {s} establish", "Which body did {s} set up", "What did {s} start",
                                 "Which institution was founded by {s}", "What was established by {s}",
                                 "Which organisation did {s} create", "What did {s} found"),
                       "answers": ("{founded_The}{founder_of}.",)},
    },
    "org": {
        "emblem": {"nouns": ("emblem", "seal", "sign", "badge", "symbol", "device"),
                   "verbs": ("What does the seal of {s} carry", "Which emblem does {s} bear", "What does {s} show on its banner",
                             "What sign does {s} use", "What is pictured on the seal of {s}",
                             "What symbol stands for {s}", "What is painted on the banner of {s}"),
                   "answers": ("A {emblem}.",)},
        "kind": {"nouns": ("kind of body", "type of institution", "sort of organisation"),
                 "verbs": ("What kind of body is {s}", "What type of institution is {s}", "What is {s}",
                           "What sort of organisation is {s}", "What manner of body is {s}",
                           "Which type of body is {s}", "What kind of place is {s}"),
                 "answers": ("{A} {kind}.", "It is {a} {kind}.")},
        "seat": {"nouns": ("seat", "home town", "headquarters", "home", "base", "location"),
                 "verbs": ("Where is {s} based", "In which town is {s} seated", "Where does {s} have its headquarters",
                           "Which town is home to {s}", "Where is {s} located", "In what town is {s} headquartered",
                           "Where does {s} meet", "Which town hosts {s}", "Where can one find {s}"),
                 "answers": ("In {seat}.", "{seat}.")},
        "founded": {"nouns": ("founding year", "year of founding", "year of foundation", "founding date"),
                    "verbs": ("When was {s} established", "In which year was {s} set up", "When did {s} come into being",
                              "In what year was {s} started", "Since when has {s} existed", "When did {s} begin",
                              "In which year was {s} created"),
                    "answers": ("{founded}.", "In {founded}.")},
        "founder": {"nouns": ("founder", "first founder", "original founder", "creator"),
                    "verbs": ("Who established {s}", "Who started {s}", "Who set up {s}", "Which person established {s}",
                              "Who is credited with founding {s}", "Who created {s}", "By whom was {s} set up"),
                    "answers": ("{founder}.", "It was {founder}.")},
        "members": {"nouns": ("membership", "number of members", "size", "member count", "head count"),
                    "verbs": ("How many members does {s} have", "How many people belong to {s}", "How large is {s}",
                              "How big is the membership of {s}", "How many members does {s} count",
                              "How many are in {s}", "How many people are members of {s}"),
                    "answers": ("About {members}.", "About {members} members.")},
        "specialty": {"nouns": ("specialty", "claim to fame", "hallmark", "speciality", "chief fame"),
                      "verbs": ("What is {s} known for", "For what is {s} famous", "What is {s} best known for",
                                "What made {s} famous", "What is {s} celebrated for", "What is {s} noted for",
                                "What does {s} do best"),
                      "answers": ("Its {specialty}.",)},
    },
}

# Free phrasings, for memory training only (benchmarks/train_memory.py --free-forms K): whole
# questions, 30 per fact kind, written on 2026-12-07 by a helper that read no file of this project (no
# template, no COMPOSED part, no held-out or blind form), asked only for the many ways people ask for
# each fact; four that repeat a held-out form of benchmarks/question_forms.py (NOVEL) were taken out. COMPOSED varies the words inside a few frames; these vary the frame (indirect, fronted,
# situational, chatty questions). Placeholders as in QUESTIONS. Never in examples/*/facts, never asked
# by the frontier; benchmarks/question_forms.py drops any blind form that one of them repeats.
FREE_FORMS = json.loads((Path(__file__).parent / "free_forms.json").read_text(encoding="utf-8"))
