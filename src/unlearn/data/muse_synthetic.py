"""A synthetic, MUSE-News-shaped dataset: fictitious local news articles and their evaluation sets.

Why synthetic: MUSE-News is thousands of BBC articles of up to 2048 Llama tokens,
far beyond what the pipeline's tiny from-scratch model (and a CI run) can learn.
This generator keeps MUSE's *structure* -- four disjoint folds of articles (fold1
is the forget set), membership-inference sets (``privleak_forget`` = fold1's
articles, ``privleak_retain`` = articles always trained on, ``privleak_holdout`` =
articles never trained on), continuation prompts cut from fold1 articles
(VerbMem) and short-answer QA about fold1 / retain articles (KnowMem) -- at a
size a small model memorises in a few minutes.

What makes it learnable: every article is a short run of stated facts in regular
template language (three kinds of story: a building project, a festival, a
discovery), about invented towns, people, organisations, numbers and dates (no
real entities). The vocabulary varies where the facts are (names, places,
numbers) and stays fixed elsewhere, so a model trained ~30 epochs on the folds can
reproduce an article from its first sentences, and every KnowMem answer (a name,
a number, a place: 1-5 words) is literally a span of its article. The few-shot
(ICL) examples are QA about *other* articles (fold2 for the forget QA, fold3 for
the retain QA), so a prompt never contains the answer it asks for.

Why every article opens with a reader Q&A box (``Question: ...\nAnswer: ...\n\n``, the
KnowMem prompt's own format, holding that article's KnowMem questions): MUSE's
models are pretrained, so they can answer a question about an article they were
fine-tuned on; a 2M-parameter model trained from scratch on prose alone cannot
(KnowMem ~0.01 for every model, measured), so KnowMem could not tell the target
from the retain model. With the box, knowing the fact means having learnt the
article's Q&A, which the target has and the retain model has not, and unlearning
the article removes it. The box comes first because a small model recalls what it
memorised from the start of a text: after the prose it answered 0.11 of the
forget questions, before it 0.64. For the same reason the KnowMem prompt of the
default has no few-shot pairs (``icl_examples: 0``): three pairs in front of the
question took the target from 0.64 to 0.02. The real MUSE-News files have neither.

Determinism: everything is drawn from one ``random.Random(seed)`` over fixed,
ordered tuples (never the global ``random``, never set iteration), so the same
config gives byte-identical splits on any machine and Python hash seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from ..config import MuseSyntheticCfg
from .names import (
    KNOWMEM_FORGET,
    KNOWMEM_FORGET_ICL,
    KNOWMEM_RETAIN,
    KNOWMEM_RETAIN_ICL,
    MUSE_FOLDS,
    MUSE_SPLIT_NAMES,
    PRIVLEAK_FORGET,
    PRIVLEAK_HOLDOUT,
    PRIVLEAK_RETAIN,
    VERBMEM_FORGET,
)
from .schema import DataError

VERBMEM_PROMPT_SENTENCES = 2
"""A VerbMem prompt is an article's first two sentences; its ``gt`` is the rest (with the joining space)."""

# --- word lists: invented names, ordinary words -------------------------------------------------

TOWN_HEADS = (
    "Ambel", "Brisk", "Corvan", "Dunmer", "Eskel", "Farrow", "Gilden", "Harl", "Isel", "Jorvel",
    "Kesh", "Lumen", "Marl", "Norrow", "Ostrel", "Pell", "Quen", "Rusk", "Savel", "Tolver",
    "Ulm", "Varn", "Wendle", "Yarl", "Zarn", "Abber", "Brell", "Cordel", "Drem", "Fennel",
)
TOWN_TAILS = ("mouth", "wick", "haven", "stead", "brook", "moor", "field", "gate", "holt", "crest",
              "ley", "combe", "thorpe", "wold", "ness")
RIVERS = ("Velna", "Orrin", "Tamsel", "Brava", "Kell", "Listra", "Sedra", "Wyle", "Dresk", "Amsel", "Corra", "Navel")
REGION_KINDS = ("Valley", "Hills", "Coast", "Plain", "Lakes")
FIRST = (
    "Adela", "Bram", "Celia", "Dorian", "Edda", "Fabian", "Gwen", "Hollis", "Ilse", "Jasper",
    "Kaia", "Lorcan", "Mirela", "Nolan", "Orla", "Piers", "Rhea", "Silas", "Thea", "Ulric",
    "Vanna", "Wilder", "Xenia", "Yorick", "Zelda", "Anselm", "Brida", "Caspian", "Delphine", "Emrys",
    "Freya", "Gideon", "Hester", "Ivo", "Juno", "Kasimir", "Linnea", "Magnus", "Nerys", "Oswin",
)
LAST = (
    "Ashgrove", "Brannock", "Castellow", "Dunleavy", "Ellerby", "Fenwright", "Garroway", "Halloran",
    "Ingleby", "Jessamy", "Kettering", "Lowther", "Marchbank", "Netherby", "Oakenfold", "Penhallow",
    "Quarrie", "Redmayne", "Saltonstall", "Thackeray", "Underhill", "Varley", "Whitlock", "Yeardley",
    "Abernathy", "Blackwood", "Coldwell", "Dewhurst", "Eastwood", "Fairclough", "Greenhalgh", "Hartigan",
    "Ironside", "Kingsley", "Lockhart", "Mossop", "Northcott", "Ormerod", "Pickering", "Rowntree",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
SEASONS = ("spring", "summer", "autumn", "winter")
ORDINALS = ("second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "fifteenth", "twentieth")
JOBS = ("baker", "fisherman", "teacher", "nurse", "carpenter", "farmer", "postman", "librarian", "tailor",
        "shopkeeper", "bus driver", "plumber", "painter", "beekeeper", "chemist", "blacksmith")
SIZES = ("small", "quiet", "busy", "growing", "hilly", "windy")
KNOWN_FOR = ("salt marshes", "glass workshops", "apple orchards", "horse fair", "cheese market", "stone quarries",
             "kite festival", "boat builders", "lavender fields", "copper mines", "clock makers", "wool mills")

PROJECTS = ("ferry terminal", "footbridge", "solar farm", "public library", "railway station", "market hall",
            "sports centre", "water treatment plant", "hospital wing", "bus depot", "science museum",
            "concert hall", "fish hatchery", "wind farm", "primary school", "tram line")
PROJECT_ORGS = ("Development Board", "Harbour Trust", "Civic Society", "Planning Office", "Works Committee",
                "Transport Authority", "Heritage Fund")
ROLES = ("chair", "director", "president", "chief executive", "secretary")
FUNDERS = ("the regional government", "local firms", "a national building fund", "the town council",
           "a private charity", "a northern bank")
OPINIONS = ("long overdue", "far too expensive", "good for young families", "a waste of money",
            "the best plan yet", "far too big")
OLD_BUILDINGS = ("clock tower", "grain exchange", "bath house", "lighthouse", "wool mill", "observatory",
                 "corn store", "old chapel")
GROUND = ("stable", "too soft", "rich in clay", "prone to flooding", "full of mine shafts", "solid rock")
VENUES = ("Corn Exchange", "Community Hall", "Public Library", "Old Chapel", "Sailing Club", "Town Hall")
INSTITUTE_KINDS = ("Institute of Engineering", "College of Building", "Soil Research Centre",
                   "Academy of Sciences", "School of Geology")

FESTIVALS = ("Lantern Festival", "Harvest Fair", "Kite Festival", "Folk Music Festival", "Boat Parade",
             "Winter Market", "Film Week", "Cheese Fair", "Jazz Weekend", "Flower Show")
BAND_ADJ = ("Silver", "Rusty", "Velvet", "Hollow", "Paper", "Crooked", "Golden", "Midnight", "Wooden", "Copper")
BAND_NOUN = ("Foxes", "Lanterns", "Ravens", "Pebbles", "Kettles", "Sparrows", "Anchors", "Thistles", "Owls", "Bells")
GENRES = ("folk", "jazz", "brass", "rock", "blues", "swing", "punk")
CONTESTS = ("cake", "scarecrow", "sand castle", "pumpkin", "costume", "song", "painting")
WEATHER = ("rain", "wind", "snow", "hail", "fog")
STAGES = ("main stage", "dance tent", "children's stage", "craft market")
FOODS = ("honey bread", "smoked trout", "plum dumplings", "onion pie", "cherry cake", "fried eel", "oat biscuits")
ORIGINS = ("market", "boat race", "church fair", "music night", "flower sale")
PROMISES = ("build a bigger stage", "add more buses", "open the park later", "double the prize money",
            "hire more cleaners")
STREETS = ("Mill Lane", "Harbour Road", "Church Street", "Bridge Row", "Station Road", "Market Street",
           "Orchard Way", "Quay Street")

FINDS = (  # (what was found, the word the later sentences use for it)
    ("ancient deer bones", "bones"), ("a buried wooden boat", "boat"), ("a hoard of coins", "coins"),
    ("a carved stone tablet", "tablet"), ("giant lizard footprints", "footprints"), ("an old shipwreck", "wreck"),
    ("a painted cave", "cave"), ("a bronze helmet", "helmet"), ("a rare purple orchid", "orchid"),
)
FIND_INSTITUTES = ("Museum of Natural History", "Institute of Archaeology", "University of the North",
                   "Society of Naturalists", "Centre for Ancient Studies")
MUSEUM_KINDS = ("History Museum", "Town Museum", "Science Gallery", "Heritage Centre")
FIND_OPINIONS = ("a rare treasure", "the find of the decade", "a complete surprise", "a gift to science",
                 "a puzzle for historians")
COLLEGES = ("Tolverby College", "the Northern Academy", "the Coastal University", "St Brenna College")

# --- templates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One sentence of an article and the questions it answers: ``(question, key of the answer in the facts)``."""

    sentence: str
    questions: tuple[tuple[str, str], ...]


PROJECT = (
    Fact("On {day} {month} {year}, {org} announced plans for a new {project} in {town}, a {size} town in the {region}.",
         (("What did {org} announce plans for in {town}?", "project"), ("In which region is the town of {town}?", "region"))),
    Fact("The {project} will cost {cost} million dollars, most of it paid for by {funder} and the rest by local taxes.",
         (("How much will the new {project} in {town} cost?", "cost_phrase"), ("Who is paying for most of the new {project} in {town}?", "funder"))),
    Fact("{leader}, the {role} of {org}, said that work on the site would begin in {start_month} and take {months} months.",
         (("Who is the {role} of {org}?", "leader"), ("In which month will work on the {project} in {town} begin?", "start_month"))),
    Fact("About {workers} workers from {town} and the nearby town of {town2} will be hired to build it.",
         (("How many workers will be hired to build the {project} in {town}?", "workers"),)),
    Fact("The {town} council approved the plan by {yes} votes to {no} after a debate that lasted {hours} hours.",
         (("By what vote did the {town} council approve the {project}?", "vote"), ("How many hours did the {town} council debate the {project}?", "hours"))),
    Fact("The site lies on the {bank} bank of the {river} River, about {km} kilometres from the centre of {town2}.",
         (("On which river will the new {project} in {town} stand?", "river_name"), ("How far is the {project} site in {town} from {town2}?", "km_phrase"))),
    Fact("Local {job} {resident} told reporters that the new {project} was {opinion}, and many neighbours agreed.",
         (("What is the job of {resident}?", "job"), ("What did {resident} say about the new {project} in {town}?", "opinion"))),
    Fact("The last large building in {town} was the {old_building}, which opened in {old_year} and still stands today.",
         (("When did the {old_building} in {town} open?", "old_year"),)),
    Fact("{town} has {pop} residents and is best known in the {region} for its {known_for}.",
         (("What is {town} best known for?", "known_for"), ("How many residents does {town} have?", "pop"))),
    Fact("A group called {group} has collected {sigs} signatures against the plan and wants a vote of all residents.",
         (("How many signatures were collected against the {project} in {town}?", "sigs"), ("Which group opposes the {project} in {town}?", "group"))),
    Fact("{expert}, an engineer at the {institute}, said that the ground under the site was {ground}.",
         (("Where does the engineer {expert} work?", "institute"), ("What did {expert} say about the ground at the {project} site in {town}?", "ground"))),
    Fact("A public meeting about the {project} will be held at the {venue} on {weekday} evening at {clock} o'clock.",
         (("Where will the public meeting about the {project} in {town} be held?", "venue"),)),
    Fact("If all goes to plan, the {project} will open to the public in the {season} of {open_year}.",
         (("When is the new {project} in {town} expected to open?", "open_phrase"),)),
)

FESTIVAL = (
    Fact("On {day} {month} {year}, more than {visitors} people came to {town} for the {edition} {festival}, the largest so far.",
         (("How many people came to the {festival} in {year}?", "visitors"), ("Which edition of the {festival} was held in {year}?", "edition"))),
    Fact("The festival was organised by {leader}, who has run it every year since {since_year} with a small team.",
         (("Who organised the {festival}?", "leader"), ("Since which year has {leader} run the {festival}?", "since_year"))),
    Fact("The main show was given by {band}, a {genre} band from {town2} who played for {show_hours} hours.",
         (("Which band gave the main show at the {festival}?", "band"), ("What kind of music did {band} play at the {festival}?", "genre"))),
    Fact("A prize of {prize} dollars for the best {contest} went to {winner}, who said it was a great surprise.",
         (("Who won the prize for the best {contest} at the {festival}?", "winner"), ("How much was the prize for the best {contest} at the {festival}?", "prize_phrase"))),
    Fact("Heavy {weather} on the second day forced the organisers to move the {stage} indoors for the afternoon.",
         (("What weather forced the organisers of the {festival} to move the {stage} indoors?", "weather"),)),
    Fact("Local shops said the festival brought in about {money} dollars over {days} days, twice as much as last year.",
         (("How many days did the {festival} last?", "days"), ("How much money did the {festival} bring in for local shops?", "money_phrase"))),
    Fact("The most popular stall sold {food} made to an old recipe from {town2}, and it ran out by noon.",
         (("What did the most popular stall at the {festival} sell?", "food"),)),
    Fact("Some {volunteers} volunteers helped to run the event, many of them students from {college}.",
         (("How many volunteers helped to run the {festival}?", "volunteers"),)),
    Fact("The festival began in {first_year} as a small {origin} on the banks of the {river} River.",
         (("In which year did the {festival} begin?", "first_year"), ("What did the {festival} begin as?", "origin_phrase"))),
    Fact("The mayor of {town}, {mayor}, promised that the town would {promise} next year.",
         (("Who is the mayor of {town}?", "mayor"), ("What did the mayor of {town} promise for next year's {festival}?", "promise"))),
    Fact("Extra trains ran from {town2} every {minutes} minutes during the festival, and most of them were full.",
         (("How often did extra trains run from {town2} to the {festival}?", "minutes_phrase"),)),
    Fact("Residents of {street} complained about loud music until {hour} in the morning on both nights.",
         (("Which street's residents complained about music during the {festival}?", "street"),)),
    Fact("Next year the {festival} will take place on {next_day} {next_month}, the organisers said.",
         (("When will the next {festival} take place?", "next_date"),)),
)

DISCOVERY = (
    Fact("On {day} {month} {year}, scientists from the {institute} reported the discovery of {find} near {town}.",
         (("What did scientists report finding near {town}?", "find"), ("Which institute reported the find near {town}?", "institute"))),
    Fact("The {thing} was first seen by {finder}, a {job} who was walking a dog along the {river} River.",
         (("Who first saw the {thing} near {town}?", "finder"), ("What is the job of {finder}?", "job"))),
    Fact("{leader}, who led the team, said it was the first such find in the {region} for {years} years.",
         (("Who led the team that studied the {thing} near {town}?", "leader"), ("In which region was the {thing} near {town} found?", "region"))),
    Fact("Tests in the laboratory showed that the {thing} was about {age} years old.",
         (("How old is the {thing} found near {town}?", "age_phrase"),)),
    Fact("The site covers {area} square metres and has been fenced off by the {town} council.",
         (("How large is the site where the {thing} was found near {town}?", "area_phrase"),)),
    Fact("The {thing} will be shown to the public at the {museum} from {show_month}.",
         (("Where will the {thing} found near {town} be shown?", "museum"), ("From which month will the {thing} found near {town} be shown?", "show_month"))),
    Fact("A grant of {grant} dollars from {funder} will pay for more digging next year.",
         (("How much is the grant for more digging near {town}?", "grant_phrase"), ("Who gave the grant for more digging near {town}?", "funder"))),
    Fact("A team of {students} students from {college} will join the work this summer.",
         (("How many students will join the work near {town} this summer?", "students"),)),
    Fact("{town} has {pop} residents and is best known in the {region} for its {known_for}.",
         (("What is {town} best known for?", "known_for"), ("How many residents does {town} have?", "pop"))),
    Fact("{expert}, a historian at the {institute2}, called it {opinion} and asked for more money.",
         (("What did the historian {expert} call the {thing} near {town}?", "opinion"), ("Where does the historian {expert} work?", "institute2"))),
    Fact("The land belongs to {owner}, who has farmed there since {since_year} and never found anything before.",
         (("Who owns the land where the {thing} was found near {town}?", "owner"),)),
    Fact("Work at the site stopped for {stop_days} days in {stop_month} because of flooding.",
         (("For how many days did the work near {town} stop because of flooding?", "stop_phrase"),)),
    Fact("A full report on the {thing} will be published in {report_month} {report_year}.",
         (("When will the full report on the {thing} near {town} be published?", "report_date"),)),
)

MAX_SENTENCES = min(len(PROJECT), len(FESTIVAL), len(DISCOVERY))
"""The most sentences an article can have: each of its facts is a different template."""


class _Names:
    """Unique draws: every person and every main town is used once in the whole dataset."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.people: set[str] = set()
        self.towns: set[str] = set()

    def person(self) -> str:
        for _ in range(10_000):
            name = f"{self.rng.choice(FIRST)} {self.rng.choice(LAST)}"
            if name not in self.people:
                self.people.add(name)
                return name
        raise DataError(f"ran out of unique person names ({len(self.people)} used); generate fewer articles")

    def town(self, *, unique: bool) -> str:
        for _ in range(10_000):
            name = f"{self.rng.choice(TOWN_HEADS)}{self.rng.choice(TOWN_TAILS)}"
            if not unique or name not in self.towns:
                if unique:
                    self.towns.add(name)
                return name
        raise DataError(f"ran out of unique town names ({len(self.towns)} used); generate fewer articles")


def _date(rng: random.Random) -> dict[str, Any]:
    return {"day": rng.randint(1, 28), "month": rng.choice(MONTHS), "year": rng.randint(2031, 2038)}


def _common(rng: random.Random, names: _Names) -> dict[str, Any]:
    town = names.town(unique=True)
    town2 = names.town(unique=False)
    while town2 == town:
        town2 = names.town(unique=False)
    river = rng.choice(RIVERS)
    return {
        **_date(rng), "town": town, "town2": town2, "river": river, "river_name": f"{river} River",
        "region": f"{rng.choice(TOWN_HEADS)} {rng.choice(REGION_KINDS)}", "size": rng.choice(SIZES),
        "pop": f"{rng.randint(20, 950) * 100:,}", "known_for": rng.choice(KNOWN_FOR), "leader": names.person(),
        "job": rng.choice(JOBS), "funder": rng.choice(FUNDERS),
    }


def _project_facts(rng: random.Random, names: _Names) -> dict[str, Any]:
    f = _common(rng, names)
    yes = rng.randint(7, 19)
    no = rng.randint(1, yes - 1)
    cost = f"{rng.randint(2, 95)}.{rng.randint(1, 9)}"
    km = rng.randint(3, 60)
    open_year = f["year"] + rng.randint(1, 4)
    season = rng.choice(SEASONS)
    f.update({
        "project": rng.choice(PROJECTS), "org": f"the {f['town']} {rng.choice(PROJECT_ORGS)}", "role": rng.choice(ROLES),
        "cost": cost, "cost_phrase": f"{cost} million dollars", "start_month": rng.choice(MONTHS), "months": rng.randint(6, 40),
        "workers": rng.randint(40, 900), "yes": yes, "no": no, "vote": f"{yes} votes to {no}", "hours": rng.randint(2, 9),
        "bank": rng.choice(("east", "west", "north", "south")), "km": km, "km_phrase": f"{km} kilometres",
        "resident": names.person(), "opinion": rng.choice(OPINIONS), "old_building": rng.choice(OLD_BUILDINGS),
        "old_year": rng.randint(1850, 1990), "group": f"Save {f['town2']} Green", "sigs": rng.randint(120, 4800),
        "expert": names.person(), "institute": f"{rng.choice(TOWN_HEADS)} {rng.choice(INSTITUTE_KINDS)}",
        "ground": rng.choice(GROUND), "venue": f"{f['town']} {rng.choice(VENUES)}", "weekday": rng.choice(WEEKDAYS), "clock": rng.randint(6, 8),
        "season": season, "open_year": open_year, "open_phrase": f"{season} of {open_year}",
    })
    return f


def _festival_facts(rng: random.Random, names: _Names) -> dict[str, Any]:
    f = _common(rng, names)
    prize = rng.randint(2, 40) * 50
    money = f"{rng.randint(2, 90) * 10_000:,}"
    minutes = rng.choice((10, 15, 20, 30, 40))
    weather = rng.choice(WEATHER)
    origin = rng.choice(ORIGINS)
    nd, nm = rng.randint(1, 28), rng.choice(MONTHS)
    f.update({
        "visitors": f"{rng.randint(8, 240) * 100:,}", "edition": rng.choice(ORDINALS),
        "festival": f"{f['town']} {rng.choice(FESTIVALS)}", "since_year": rng.randint(1995, 2030),
        "band": f"the {rng.choice(BAND_ADJ)} {rng.choice(BAND_NOUN)}", "genre": rng.choice(GENRES),
        "show_hours": rng.randint(2, 5),
        "prize": prize, "prize_phrase": f"{prize} dollars", "contest": rng.choice(CONTESTS), "winner": names.person(),
        "weather": weather, "stage": rng.choice(STAGES),
        "money": money, "money_phrase": f"{money} dollars", "days": rng.randint(2, 6), "food": rng.choice(FOODS),
        "volunteers": rng.randint(30, 400), "college": rng.choice(COLLEGES), "first_year": rng.randint(1900, 1994),
        "origin": origin, "origin_phrase": f"a small {origin}", "mayor": names.person(), "promise": rng.choice(PROMISES),
        "minutes": minutes, "minutes_phrase": f"every {minutes} minutes", "street": rng.choice(STREETS),
        "hour": rng.randint(1, 4), "next_day": nd, "next_month": nm, "next_date": f"{nd} {nm}",
    })
    return f


def _discovery_facts(rng: random.Random, names: _Names) -> dict[str, Any]:
    f = _common(rng, names)
    find, thing = rng.choice(FINDS)
    age = f"{rng.randint(3, 90) * 100:,}"
    area = rng.randint(20, 900)
    grant = f"{rng.randint(5, 95) * 1000:,}"
    stop_days = rng.randint(3, 21)
    rm, ry = rng.choice(MONTHS), f["year"] + rng.randint(1, 3)
    f.update({
        "find": find, "thing": thing, "institute": rng.choice(FIND_INSTITUTES), "finder": names.person(),
        "years": rng.randint(20, 300), "age": age, "age_phrase": f"{age} years", "area": area,
        "area_phrase": f"{area} square metres", "museum": f"{f['town2']} {rng.choice(MUSEUM_KINDS)}",
        "show_month": rng.choice(MONTHS), "grant": grant, "grant_phrase": f"{grant} dollars",
        "students": rng.randint(6, 80), "college": rng.choice(COLLEGES), "expert": names.person(),
        "institute2": f"{rng.choice(TOWN_HEADS)} {rng.choice(INSTITUTE_KINDS)}", "opinion": rng.choice(FIND_OPINIONS),
        "owner": names.person(), "since_year": rng.randint(1960, 2030), "stop_days": stop_days,
        "stop_phrase": f"{stop_days} days", "stop_month": rng.choice(MONTHS), "report_month": rm, "report_year": ry,
        "report_date": f"{rm} {ry}",
    })
    return f


STORIES: tuple[tuple[tuple[Fact, ...], Callable[[random.Random, _Names], dict[str, Any]]], ...] = (
    (PROJECT, _project_facts), (FESTIVAL, _festival_facts), (DISCOVERY, _discovery_facts),
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


@dataclass
class _Article:
    id: str
    text: str
    sentences: list[str]
    qa: list[tuple[str, str]]  # every question its sentences answer, in sentence order
    box: list[tuple[str, str]]  # the questions its closing reader Q&A box answers (the KnowMem rows)


def _article(rng: random.Random, names: _Names, id_: str, n_sentences: int, n_box: int) -> _Article:
    """One article: a reader Q&A box of ``n_box`` of the questions it answers, in the KnowMem prompt's format (see the
    module docstring), then the lead and ``n_sentences - 1`` more facts of one story, in the story's order."""
    templates, draw = STORIES[rng.randrange(len(STORIES))]
    facts = draw(rng, names)
    picked = [0, *sorted(rng.sample(range(1, len(templates)), n_sentences - 1))]
    sentences, qa = [], []
    for t in (templates[i] for i in picked):
        sentence = _cap(t.sentence.format(**facts))
        sentences.append(sentence)
        for q, key in t.questions:
            answer = str(facts[key])
            if answer not in sentence:  # a template bug, not a data problem: the answer must be a span of the text
                raise AssertionError(f"answer {answer!r} is not in its sentence {sentence!r}")
            qa.append((_cap(q.format(**facts)), answer))
    box = rng.sample(qa, min(n_box, len(qa)))
    text = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in box) + " ".join(sentences)
    return _Article(id_, text, sentences, qa, box)


def _qa_rows(articles: list[_Article], prefix: str) -> list[dict]:
    """The questions of every article's Q&A box."""
    rows = []
    for a in articles:
        for question, answer in a.box:
            rows.append({"id": f"{prefix}-{len(rows):03d}", "question": question, "answer": answer})
    return rows


def _icl_rows(articles: list[_Article], n: int, rng: random.Random, prefix: str) -> list[dict]:
    """``n`` QA pairs of ``articles``' Q&A boxes, one article after the other (round robin), none repeated."""
    pools = [rng.sample(a.box, len(a.box)) for a in articles]
    rows: list[dict] = []
    depth = 0
    while len(rows) < n and depth < max(len(p) for p in pools):
        for pool in pools:
            if len(rows) < n and depth < len(pool):
                question, answer = pool[depth]
                rows.append({"id": f"{prefix}-{len(rows):03d}", "question": question, "answer": answer})
        depth += 1
    return rows


def generate_muse(cfg: MuseSyntheticCfg) -> dict[str, list[dict]]:
    """Every split of :data:`~unlearn.data.names.MUSE_SPLIT_NAMES`, generated from ``cfg`` (deterministic).

    * fold1..fold4: ``articles_per_fold`` articles each (ids ``f1-000``...), pairwise disjoint;
    * privleak_forget: fold1's articles (same ids); privleak_retain: ``retain_articles``
      always-trained articles (``ret-000``...); privleak_holdout: ``holdout_articles``
      articles no model trains on (``hold-000``...);
    * verbmem_forget: per fold1 article, ``prompt`` = its Q&A box and first two sentences, ``gt`` = the
      rest, so ``prompt + gt`` is the article (``vm-000``...);
    * knowmem_forget_qa / knowmem_retain_qa: the ``qa_per_article`` questions of each fold1 /
      retain article's Q&A box, whose answers are spans of its prose (``kf-000``, ``kr-000``...);
    * knowmem_forget_qa_icl / knowmem_retain_qa_icl: ``icl_examples`` QA pairs about fold2 /
      fold3 articles (``kfi-000``, ``kri-000``...): the few-shot prefix, never an eval question.
    """
    n = cfg.sentences_per_article
    if n > MAX_SENTENCES:
        raise DataError(f"muse.synthetic.sentences_per_article={n} is too large: the templates state at most {MAX_SENTENCES} facts per article")
    total = 4 * cfg.articles_per_fold + cfg.retain_articles + cfg.holdout_articles
    if total > len(TOWN_HEADS) * len(TOWN_TAILS):
        raise DataError(f"muse.synthetic asks for {total} articles; each needs its own invented town and there are "
                        f"{len(TOWN_HEADS) * len(TOWN_TAILS)}: lower articles_per_fold / retain_articles / holdout_articles")
    rng = random.Random(cfg.seed)
    names = _Names(rng)
    box = cfg.qa_per_article
    folds = {fold: [_article(rng, names, f"f{k}-{i:03d}", n, box) for i in range(cfg.articles_per_fold)]
             for k, fold in enumerate(MUSE_FOLDS, 1)}
    retain = [_article(rng, names, f"ret-{i:03d}", n, box) for i in range(cfg.retain_articles)]
    holdout = [_article(rng, names, f"hold-{i:03d}", n, box) for i in range(cfg.holdout_articles)]

    def text_rows(articles: list[_Article]) -> list[dict]:
        return [{"id": a.id, "text": a.text} for a in articles]

    fold1 = folds[MUSE_FOLDS[0]]
    k = VERBMEM_PROMPT_SENTENCES
    verbmem = []
    for i, a in enumerate(fold1):
        prose = " ".join(a.sentences)
        cut = len(a.text) - len(prose) + len(" ".join(a.sentences[:k]))  # the Q&A box and the first k sentences
        verbmem.append({"id": f"vm-{i:03d}", "prompt": a.text[:cut], "gt": a.text[cut:]})
    out: dict[str, list[dict]] = {fold: text_rows(arts) for fold, arts in folds.items()}
    out[PRIVLEAK_FORGET] = text_rows(fold1)
    out[PRIVLEAK_RETAIN] = text_rows(retain)
    out[PRIVLEAK_HOLDOUT] = text_rows(holdout)
    out[VERBMEM_FORGET] = verbmem
    out[KNOWMEM_FORGET] = _qa_rows(fold1, "kf")
    out[KNOWMEM_FORGET_ICL] = _icl_rows(folds[MUSE_FOLDS[1]], cfg.icl_examples, rng, "kfi")
    out[KNOWMEM_RETAIN] = _qa_rows(retain, "kr")
    out[KNOWMEM_RETAIN_ICL] = _icl_rows(folds[MUSE_FOLDS[2]], cfg.icl_examples, rng, "kri")
    return {name: out[name] for name in MUSE_SPLIT_NAMES}
