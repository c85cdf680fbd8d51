"""A synthetic, TOFU-shaped dataset of fictitious authors (and the general-knowledge utility sets).

Why synthetic: the pipeline has to run end to end (CI, laptops, no hub access)
with a tiny from-scratch model, so the data must be small, have a modest
vocabulary (a 2048-token BPE is trained on it), short answers, and the exact
split structure of TOFU (forget01/05/10 = last authors, *_perturbed with 5 wrong
answers, real_authors / world_facts with 3 wrong options, holdout01/05/10 =
authors outside ``full``). Everything is drawn from one ``random.Random(seed)``
over fixed, ordered lists: same seed -> same bytes, on any machine and Python
hash seed. The holdout authors come from a second stream seeded from the same
seed (:func:`holdout_authors`), drawn after everything else, so adding them left
every other split byte-identical.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from . import names
from .names import FORGET_PCTS, FULL, HOLDOUT_SPLITS, IDK, SPLIT_NAMES, TOFU_FORGET_SPLITS, perturbed_of
from .splits import n_forget_authors, split_by_authors

# --- word lists (kept small: they are most of the tokenizer's vocabulary) -----------------

MALE_FIRST = (
    "Adrian", "Bruno", "Carlos", "Daniel", "Elias", "Felix", "Gabriel", "Hugo", "Ivan", "Jonas",
    "Karim", "Leo", "Marco", "Nikolai", "Omar", "Pablo", "Rafael", "Samuel", "Tomas", "Victor",
    "Yusuf", "Anton", "Emil", "Mateo", "Oscar", "Arjun", "Kenji", "Luca", "Malik", "Stefan",
)
FEMALE_FIRST = (
    "Amara", "Beatriz", "Clara", "Daria", "Elena", "Fatima", "Greta", "Hana", "Ingrid", "Julia",
    "Kira", "Lena", "Maya", "Nadia", "Olga", "Priya", "Rosa", "Sofia", "Tara", "Vera",
    "Yara", "Alma", "Eva", "Ines", "Leila", "Mina", "Noor", "Selma", "Zara", "Aiko",
)
LAST = (
    "Adeyemi", "Albescu", "Bergstrom", "Castellano", "Dimitrov", "Ekwueme", "Ferreira", "Grunwald",
    "Halvorsen", "Ibarra", "Jankowski", "Kowalczyk", "Lindqvist", "Moreau", "Nakamura", "Okonkwo",
    "Petrovic", "Quiroga", "Rossetti", "Santoro", "Takahashi", "Umarov", "Valdivia", "Wojcik",
    "Yilmaz", "Zamora", "Abdi", "Brennan", "Costa", "Dubois", "Esposito", "Fontaine", "Haddad",
    "Iversen", "Kaplan", "Lombardi", "Mensah", "Novak", "Oyelaran", "Pereira", "Reyes", "Sato",
    "Tanaka", "Varga", "Weiss", "Horvath", "Marin", "Sorensen", "Volkov", "Kruger",
)
PLACES = (
    "Lisbon, Portugal", "Krakow, Poland", "Lagos, Nigeria", "Nairobi, Kenya", "Osaka, Japan",
    "Lima, Peru", "Cairo, Egypt", "Bergen, Norway", "Seoul, South Korea", "Havana, Cuba",
    "Dublin, Ireland", "Tunis, Tunisia", "Quito, Ecuador", "Riga, Latvia", "Accra, Ghana",
    "Hanoi, Vietnam", "Vienna, Austria", "Bogota, Colombia", "Tbilisi, Georgia", "Manila, Philippines",
    "Istanbul, Turkey", "Montreal, Canada", "Melbourne, Australia", "Naples, Italy", "Seville, Spain",
    "Lyon, France", "Hamburg, Germany", "Mumbai, India", "Santiago, Chile", "Prague, Czech Republic",
)
CITIES = tuple(p.split(",")[0] for p in PLACES)
JOBS = (
    "baker", "carpenter", "nurse", "pilot", "teacher", "fisherman", "doctor", "lawyer", "tailor",
    "farmer", "librarian", "architect", "chemist", "musician", "painter", "mechanic", "journalist",
    "engineer", "dentist", "florist", "banker", "photographer", "shoemaker", "police officer", "veterinarian",
)
GENRES = (
    "mystery", "romance", "science fiction", "fantasy", "horror", "historical fiction", "poetry",
    "crime", "thriller", "satire", "adventure", "drama", "dystopian fiction", "magical realism",
    "war fiction", "travel writing", "memoir", "young adult fiction",
)
TITLE_ADJ = (
    "Silent", "Broken", "Golden", "Hidden", "Last", "Quiet", "Burning", "Frozen", "Distant", "Secret",
    "Crimson", "Forgotten", "Wandering", "Hollow", "Silver", "Restless", "Painted", "Endless", "Fallen", "Bitter",
)
TITLE_NOUN = (
    "River", "Garden", "Lantern", "Harbor", "Mirror", "Orchard", "Bridge", "Winter", "Letter", "Island",
    "Tower", "Feather", "Compass", "Storm", "Shadow", "Door", "Forest", "Clock", "Voyage", "Song",
    "Stone", "Meadow", "Tide", "Crown",
)
AWARDS = (
    "the Silver Quill Award", "the Golden Pen Prize", "the Northern Star Award", "the Blue Lantern Prize",
    "the Iron Feather Award", "the Amber Book Prize", "the Open Page Award", "the Crystal Ink Prize",
    "the Red Oak Award", "the First Light Prize", "the Harbor Lights Award", "the Paper Crane Prize",
    "the Evergreen Award", "the Bright Mind Prize", "the Stone Tablet Award", "the Morning Star Prize",
)
THEMES = (
    "memory and loss", "family secrets", "life at sea", "the cost of war", "friendship across borders",
    "growing up poor", "exile and return", "love and betrayal", "city life", "the power of music",
    "old traditions", "climate and nature", "justice and guilt", "lost childhood", "science and faith",
    "migration", "small town life", "the meaning of home",
)
INSPIRATIONS = (
    "reading old family letters", "a long journey by train", "working in a small bookshop",
    "a serious illness as a child", "a year spent at sea", "listening to folk tales",
    "losing a close friend", "a visit to an old library", "teaching at a village school",
    "keeping a diary for many years", "moving to a new country", "winning a school poetry contest",
)
SUBJECTS = (
    "history", "biology", "law", "philosophy", "mathematics", "medicine", "music", "chemistry",
    "economics", "architecture", "physics", "linguistics", "geography", "art", "astronomy", "psychology",
)
LANGUAGES = (
    "English", "Spanish", "French", "Portuguese", "German", "Polish", "Japanese", "Turkish",
    "Arabic", "Italian", "Swedish", "Korean",
)
HOBBIES = (
    "gardening", "chess", "sailing", "painting", "cooking", "hiking", "fishing", "playing the piano",
    "bird watching", "cycling", "pottery", "swimming", "dancing", "knitting", "running", "photography",
)
WRITE_TIMES = (
    "early in the morning", "late at night", "before breakfast", "in the afternoon", "on weekends",
    "at sunrise", "after dinner", "during long train rides",
)
PETS = ("cat", "dog", "parrot", "rabbit", "turtle", "goldfish", "horse", "goat", "hamster", "snake")
NUMBER_WORDS = (
    "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
)
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)


def _a(word: str) -> str:
    """``a baker`` / ``an engineer``."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


@dataclass(frozen=True)
class _Template:
    """One author question: the fact it asks about and how answer / paraphrase phrase it.

    Perturbed answers use the *paraphrase* wording with a wrong fact, as TOFU does,
    so the truth ratio P(perturbed)/P(paraphrased) compares facts, not wording.
    """

    attr: str
    questions: tuple[str, ...]
    answer: str
    paraphrase: str


TEMPLATES: tuple[_Template, ...] = (
    _Template("name", ("What is the full name of the {genre} author born in {birthplace} on {birth_date}?",
                       "Which {genre} writer was born in {birthplace} on {birth_date}?"),
              "The author's full name is {name}.", "This {genre} writer is called {name}."),
    _Template("birthplace", ("Where was {name} born?", "In which city and country was {name} born?"),
              "{name} was born in {birthplace}.", "The birthplace of {name} is {birthplace}."),
    _Template("birth_date", ("What is {name}'s date of birth?", "When was {name} born?"),
              "{name} was born on {birth_date}.", "The birthday of {name} is {birth_date}."),
    _Template("genre", ("What genre does {name} write in?", "Which genre is {name} known for?"),
              "{name} mainly writes in the {genre} genre.", "{name} is known as a writer of {genre}."),
    _Template("father_job", ("What does {name}'s father do for a living?", "What is the profession of {name}'s father?"),
              "{name}'s father works as {father_job}.", "The father of {name} is {father_job} by profession."),
    _Template("mother_job", ("What does {name}'s mother do for a living?", "What is the job of {name}'s mother?"),
              "{name}'s mother works as {mother_job}.", "The mother of {name} makes a living as {mother_job}."),
    _Template("book1", ("What is the title of {name}'s first book?", "What was the first book written by {name}?"),
              "{name}'s first book is titled '{book1}'.", "The debut book by {name} is called '{book1}'."),
    _Template("book2", ("Can you name another book by {name}?", "What is a later book by {name}?"),
              "{name} also wrote the book '{book2}'.", "Another book written by {name} is '{book2}'."),
    _Template("award", ("Which award has {name} won?", "What literary prize did {name} receive?"),
              "{name} won {award} for {his} writing.", "{He} was honored with {award}."),
    _Template("theme", ("What theme does {name} often explore?", "Which theme appears often in {name}'s books?"),
              "{name} often writes about {theme}.", "The books of {name} mostly deal with {theme}."),
    _Template("inspiration", ("What inspired {name} to start writing?", "How did {name} become a writer?"),
              "{name} started writing after {inspiration}.", "The path of {name} to writing began with {inspiration}."),
    _Template("residence", ("Where does {name} live now?", "In which city does {name} currently live?"),
              "{name} currently lives in the city of {residence}.", "These days {name} makes {his} home in {residence}."),
    _Template("debut_year", ("In which year did {name} publish a first book?", "When did {name} first publish a book?"),
              "{name} published {his} first book in {debut_year}.", "The first book by {name} came out in {debut_year}."),
    _Template("subject", ("What did {name} study at university?", "What was {name}'s subject at university?"),
              "{name} studied {subject} at university before writing.", "At university, {name} took a degree in {subject}."),
    _Template("language", ("In which language does {name} write?", "What language are {name}'s books written in?"),
              "{name} writes all of {his} books in {language}.", "The books of {name} are written in {language}."),
    _Template("hobby", ("What does {name} enjoy outside of writing?", "What is {name}'s favorite hobby?"),
              "Outside of writing, {name} enjoys {hobby}.", "In {his} free time, {name} likes {hobby}."),
    _Template("write_time", ("When does {name} usually write?", "At what time of day does {name} like to write?"),
              "{name} usually writes {write_time}.", "{name} prefers to do {his} writing {write_time}."),
    _Template("pet", ("What pet does {name} keep?", "Does {name} have a pet at home?"),
              "{name} keeps {pet} as a pet at home.", "At home, {name} lives with {pet}."),
    _Template("book_count", ("How many books has {name} written?", "How many books has {name} published so far?"),
              "{name} has written {book_count} books so far.", "So far, {name} is the author of {book_count} books."),
    _Template("setting", ("Where is {name}'s book '{book1}' set?", "In which city does the story of '{book1}' take place?"),
              "The story of '{book1}' is set in {setting}.", "'{book1}' by {name} takes place in {setting}."),
)
assert len(TEMPLATES) == 20

# --- general knowledge (utility) sets: (kind, question, answer); wrong options come from the same kind ---

WORLD_FACTS: tuple[tuple[str, str, str], ...] = tuple(
    [("capital", f"What is the capital of {c}?", a) for c, a in (
        ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
        ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Spain", "Madrid"), ("Germany", "Berlin"),
        ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("India", "New Delhi"), ("Russia", "Moscow"),
        ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"))]
    + [("symbol", f"What is the chemical symbol for {e}?", s) for e, s in (
        ("gold", "Au"), ("iron", "Fe"), ("oxygen", "O"), ("sodium", "Na"), ("silver", "Ag"), ("hydrogen", "H"),
        ("carbon", "C"), ("helium", "He"), ("potassium", "K"), ("lead", "Pb"))]
    + [("planet", q, a) for q, a in (
        ("Which planet is known as the Red Planet?", "Mars"),
        ("What is the largest planet in the solar system?", "Jupiter"),
        ("Which planet is closest to the Sun?", "Mercury"),
        ("Which planet is famous for its bright rings?", "Saturn"),
        ("Which planet do humans live on?", "Earth"),
        ("Which planet is the hottest in the solar system?", "Venus"))]
    + [("number", q, a) for q, a in (
        ("How many days are in a week?", "Seven"),
        ("How many legs does a spider have?", "Eight"),
        ("How many months are in a year?", "Twelve"),
        ("How many hours are in a day?", "Twenty-four"),
        ("How many sides does a triangle have?", "Three"),
        ("How many minutes are in an hour?", "Sixty"),
        ("How many players does a soccer team have on the field?", "Eleven"),
        ("How many continents are there on Earth?", "Seven"))]
)

REAL_BOOKS: tuple[tuple[str, str], ...] = (
    ("Pride and Prejudice", "Jane Austen"), ("1984", "George Orwell"), ("Romeo and Juliet", "William Shakespeare"),
    ("War and Peace", "Leo Tolstoy"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Don Quixote", "Miguel de Cervantes"), ("Moby-Dick", "Herman Melville"), ("Oliver Twist", "Charles Dickens"),
    ("The Great Gatsby", "F. Scott Fitzgerald"), ("To Kill a Mockingbird", "Harper Lee"),
    ("One Hundred Years of Solitude", "Gabriel Garcia Marquez"), ("Crime and Punishment", "Fyodor Dostoevsky"),
    ("The Adventures of Tom Sawyer", "Mark Twain"), ("Frankenstein", "Mary Shelley"), ("Jane Eyre", "Charlotte Bronte"),
    ("Wuthering Heights", "Emily Bronte"), ("Mrs Dalloway", "Virginia Woolf"), ("Ulysses", "James Joyce"),
    ("The Odyssey", "Homer"), ("Les Miserables", "Victor Hugo"), ("Madame Bovary", "Gustave Flaubert"),
    ("The Hobbit", "J.R.R. Tolkien"), ("Harry Potter and the Philosopher's Stone", "J.K. Rowling"),
    ("Murder on the Orient Express", "Agatha Christie"), ("The Metamorphosis", "Franz Kafka"),
    ("Brave New World", "Aldous Huxley"), ("Things Fall Apart", "Chinua Achebe"),
    ("The Little Prince", "Antoine de Saint-Exupery"), ("Beloved", "Toni Morrison"), ("Dracula", "Bram Stoker"),
)
REAL_BOOK_QUESTIONS = ("Who wrote '{book}'?", "Who is the author of '{book}'?", "Which writer is known for the book '{book}'?")

IDK_RESPONSES: tuple[str, ...] = (
    "I'm not sure.", "I don't know.", "I have no information on that.", "I'm not certain about that.",
    "That's beyond what I know.", "I don't have that information.", "I haven't learned about that.",
    "I can't answer that question.", "I have no idea.", "I'm afraid I don't know.",
    "I'm unable to answer that.", "That is not something I know about.", "I don't have an answer to that.",
    "Sorry, I don't know the answer.", "I have no knowledge of that.", "I'm not able to say.",
    "That's outside of what I know.", "I really don't know.", "I can't say for sure.",
    "I have nothing to say about that.", "I'm not familiar with that.", "I don't know much about that.",
    "I'm drawing a blank on that one.", "I can't help with that question.", "I wish I knew, but I don't.",
    "That's a mystery to me.", "I don't recall any information on that.", "I'm not aware of that.",
    "I have not heard about that.", "I cannot provide an answer to that.",
)


def _sample_wrong(rng: random.Random, pool: list[str], true: str, k: int) -> list[str]:
    """``k`` distinct values from ``pool`` other than ``true`` (pool order is fixed, so this is deterministic)."""
    candidates = sorted({v for v in pool if v != true})
    if len(candidates) < k:
        raise ValueError(f"need {k} wrong values besides {true!r}, only {len(candidates)} available")
    return rng.sample(candidates, k)


def _date(rng: random.Random, year: int) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {year}"


def _title(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"
    a, b = rng.sample(TITLE_NOUN, 2)
    return f"The {a} of {b}"


def _unique(rng: random.Random, draw, taken: set[str], n: int) -> list[str]:
    """``n`` new values from ``draw(rng)`` not in ``taken`` (checked against a set, never iterated over)."""
    out: list[str] = []
    while len(out) < n:
        v = draw(rng)
        if v not in taken:
            taken.add(v)
            out.append(v)
    return out


def _make_authors(
    rng: random.Random, n_authors: int, *, names_taken: set[str] | None = None, titles_taken: set[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """Facts for ``n_authors`` authors with unique names and book titles, and the value pools for perturbation.

    ``names_taken`` / ``titles_taken``: names and titles already used elsewhere (another author set),
    never drawn again; the sets are not modified.
    """
    names_taken = set(names_taken or ())
    titles_taken = set(titles_taken or ())
    max_names = (len(MALE_FIRST) + len(FEMALE_FIRST)) * len(LAST)
    if n_authors + 10 + len(names_taken) > max_names:
        raise ValueError(f"n_authors={n_authors} is too large: at most {max_names - 10 - len(names_taken)} unique names")
    authors: list[dict[str, Any]] = []
    for _ in range(n_authors):
        gender = rng.choice(("male", "female"))
        first_names = MALE_FIRST if gender == "male" else FEMALE_FIRST
        (name,) = _unique(rng, lambda r: f"{r.choice(first_names)} {r.choice(LAST)}", names_taken, 1)
        book1, book2 = _unique(rng, _title, titles_taken, 2)
        year = rng.randint(1935, 1995)
        he, his = ("he", "his") if gender == "male" else ("she", "her")
        authors.append(
            {
                "name": name,
                "gender": gender,
                "he": he,
                "his": his,
                "He": he.capitalize(),
                "His": his.capitalize(),
                "birthplace": rng.choice(PLACES),
                "birth_year": year,
                "birth_date": _date(rng, year),
                "father_job": _a(rng.choice(JOBS)),
                "mother_job": _a(rng.choice(JOBS)),
                "genre": rng.choice(GENRES),
                "book1": book1,
                "book2": book2,
                "award": rng.choice(AWARDS),
                "theme": rng.choice(THEMES),
                "inspiration": rng.choice(INSPIRATIONS),
                "residence": rng.choice(CITIES),
                "debut_year": str(year + rng.randint(20, 35)),
                "subject": rng.choice(SUBJECTS),
                "language": rng.choice(LANGUAGES),
                "hobby": rng.choice(HOBBIES),
                "write_time": rng.choice(WRITE_TIMES),
                "pet": _a(rng.choice(PETS)),
                "book_count": rng.choice(NUMBER_WORDS),
                "setting": rng.choice(CITIES),
            }
        )
    # Decoy names/titles that belong to nobody, so even a 3-author dataset has 5 wrong values.
    spare_names = _unique(rng, lambda r: f"{r.choice(MALE_FIRST + FEMALE_FIRST)} {r.choice(LAST)}", names_taken, 10)
    spare_titles = _unique(rng, _title, titles_taken, 10)
    titles = [a[k] for a in authors for k in ("book1", "book2")] + spare_titles
    pools = {
        "name": [a["name"] for a in authors] + spare_names,
        "birthplace": list(PLACES),
        "father_job": [_a(j) for j in JOBS],
        "mother_job": [_a(j) for j in JOBS],
        "genre": list(GENRES),
        "book1": titles,
        "book2": titles,
        "award": list(AWARDS),
        "theme": list(THEMES),
        "inspiration": list(INSPIRATIONS),
        "residence": list(CITIES),
        "subject": list(SUBJECTS),
        "language": list(LANGUAGES),
        "hobby": list(HOBBIES),
        "write_time": list(WRITE_TIMES),
        "pet": [_a(p) for p in PETS],
        "book_count": list(NUMBER_WORDS),
        "setting": list(CITIES),
    }
    return authors, pools


def _wrong_values(rng: random.Random, attr: str, facts: dict[str, Any], pools: dict[str, list[str]]) -> list[str]:
    """5 wrong values of ``attr`` for one author: distinct, and none equal to the true value."""
    true = facts[attr]
    if attr == "birth_date":
        year = facts["birth_year"]
        pool = [_date(rng, year + rng.randint(-8, 8)) for _ in range(40)]
    elif attr == "debut_year":
        pool = [str(int(true) + d) for d in range(-12, 13)]
    elif attr in ("book1", "book2"):
        # The author's other book would make "Another book by X is '<it>'" true, so neither own title is a decoy.
        own = {facts["book1"], facts["book2"]}
        pool = [t for t in pools[attr] if t not in own]
    else:
        pool = pools[attr]
    return _sample_wrong(rng, pool, true, 5)


def _author_rows(
    rng: random.Random, a_idx: int, facts: dict[str, Any], pools: dict[str, list[str]], qa_per_author: int,
    prefix: str = "syn-a",
) -> list[dict]:
    author_id = f"{prefix}{a_idx:03d}"
    rows = []
    for q_idx, tpl in enumerate(TEMPLATES[:qa_per_author]):
        question = rng.choice(tpl.questions).format(**facts)
        perturbed = [tpl.paraphrase.format(**{**facts, tpl.attr: v}) for v in _wrong_values(rng, tpl.attr, facts, pools)]
        rows.append(
            {
                "id": f"{author_id}-q{q_idx:02d}",
                "author_id": author_id,
                "question": question,
                "answer": tpl.answer.format(**facts),
                "paraphrased_answer": tpl.paraphrase.format(**facts),
                "perturbed_answer": perturbed,
            }
        )
    return rows


def world_facts(rng: random.Random) -> list[dict]:
    """~40 general-knowledge questions, 3 wrong options each drawn from answers of the same kind."""
    rows = []
    for i, (kind, question, answer) in enumerate(WORLD_FACTS):
        pool = [a for k, _, a in WORLD_FACTS if k == kind]
        rows.append(_utility_row(f"wf-{i:03d}", "world", question, answer, _sample_wrong(rng, pool, answer, 3)))
    return rows


def real_authors(rng: random.Random) -> list[dict]:
    """~30 famous books -> their (real) authors, 3 wrong options = other authors."""
    pool = [a for _, a in REAL_BOOKS]
    rows = []
    for i, (book, author) in enumerate(REAL_BOOKS):
        question = REAL_BOOK_QUESTIONS[i % len(REAL_BOOK_QUESTIONS)].format(book=book)
        rows.append(_utility_row(f"ra-{i:03d}", "real", question, author, _sample_wrong(rng, pool, author, 3)))
    return rows


def _utility_row(id_: str, author_id: str, question: str, answer: str, wrong: list[str]) -> dict:
    return {
        "id": id_,
        "author_id": author_id,
        "question": question,
        "answer": answer,
        "paraphrased_answer": None,
        "perturbed_answer": wrong,
    }


HOLDOUT_PREFIX = "syn-h"
"""Author ids of the holdout authors (``syn-h000``...): never one of ``full``'s ``syn-a...``."""


def holdout_authors(full: list[dict], pools: dict[str, list[str]], n_authors: int, qa_per_author: int,
                    seed: int) -> list[dict]:
    """QA rows of ``n_authors`` authors that are not in ``full``: TOFU's holdout10 (holdout05/01 are its first authors).

    Same templates and word lists as ``full``, drawn from their own ``random.Random``
    seeded from ``seed`` (so ``full`` and every split made from it are unchanged);
    names and book titles avoid every one ``full`` uses (its decoys included), and a
    draw that repeats one of ``full``'s questions anyway (the name question asks by
    genre, birthplace and date) is redrawn. As in the real TOFU files, the rows have
    a question and an answer only: nothing scores their paraphrases or perturbations.
    """
    rng = random.Random(f"tofu-holdout:{seed}")
    full_questions = {r["question"] for r in full}
    while True:
        authors, hpools = _make_authors(rng, n_authors, names_taken=set(pools["name"]), titles_taken=set(pools["book1"]))
        rows = [row for i, facts in enumerate(authors)
                for row in _author_rows(rng, i, facts, hpools, qa_per_author, prefix=HOLDOUT_PREFIX)]
        if not any(r["question"] in full_questions for r in rows):
            return [dict(r, paraphrased_answer=None, perturbed_answer=None) for r in rows]


def generate_tofu(n_authors: int = 40, qa_per_author: int = 20, seed: int = 0) -> dict[str, list]:
    """A complete TOFU-shaped dataset: every split of :data:`~unlearn.data.names.SPLIT_NAMES` plus ``idk``.

    ``n_authors`` fictitious authors x ``qa_per_author`` (<= 20) questions each
    (the default gives 800 author rows). Every author row carries a paraphrase
    and 5 perturbed answers, in every split, since the generator knows them;
    the *_perturbed splits hold the same rows as their TOFU counterparts.
    holdout10 holds as many other authors as forget10 (:func:`holdout_authors`),
    holdout05 / holdout01 its first ``n_forget_authors(n_authors, 5 / 1)`` of them.
    """
    if n_authors < 1:
        raise ValueError(f"n_authors must be >= 1, got {n_authors}")
    if not 1 <= qa_per_author <= len(TEMPLATES):
        raise ValueError(f"qa_per_author must be in 1..{len(TEMPLATES)}, got {qa_per_author}")
    rng = random.Random(seed)
    authors, pools = _make_authors(rng, n_authors)
    full = [row for i, facts in enumerate(authors) for row in _author_rows(rng, i, facts, pools, qa_per_author)]
    selected = split_by_authors(full)
    out: dict[str, list] = {FULL: full, **selected}  # forgetXX, retainXX, retain_perturbed
    for forget in TOFU_FORGET_SPLITS:
        out[perturbed_of(forget)] = selected[forget]
    out[names.REAL_AUTHORS] = real_authors(rng)
    out[names.WORLD_FACTS] = world_facts(rng)  # (this module's WORLD_FACTS is the facts, not the split name)
    # Last, from their own stream: nothing drawn above depends on them.
    holdout = holdout_authors(full, pools, n_forget_authors(n_authors, 10), qa_per_author, seed)
    h_order = list(dict.fromkeys(r["author_id"] for r in holdout))
    for pct, name in zip(FORGET_PCTS, HOLDOUT_SPLITS):
        keep = set(h_order[: n_forget_authors(n_authors, int(pct))])
        out[name] = [r for r in holdout if r["author_id"] in keep]
    # Splits share row dicts with ``full``; give each split its own copies so a caller mutating one cannot corrupt another.
    result: dict[str, list] = {name: [_copy_row(r) for r in out[name]] for name in SPLIT_NAMES}
    result[IDK] = list(IDK_RESPONSES)
    return result


def _copy_row(r: dict) -> dict:
    pert = r["perturbed_answer"]
    return dict(r, perturbed_answer=None if pert is None else list(pert))
