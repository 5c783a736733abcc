"""The default data: a small seeded world, and every file the recipe trains and evaluates on.

The world is a few dozen people - each with a home town, a job, a pet (an animal with a name), a
favourite colour and food, and an age - a dozen towns with a landmark each, and some animals with
their facts. `generate_world(out_dir, config, seed)` writes, from that world:

    pretrain_{train,val}.jsonl   {"text"}: bios, stories, conversations in prose, arithmetic, counting,
                                 places, animals and reading lessons. Every fact is stated many times, in
                                 many phrasings: this is where the model learns the world (and small sums,
                                 and how to answer a question about a passage).
    sft_{train,val}.jsonl        {"messages", "kind", "quality", "judge", "facts_asked"}: chat
                                 demonstrations of mixed quality (good / verbose / curt / wrong), as
                                 real human demonstrations are, so RLHF has something to improve on.
    prompts_{ranking,ppo,eval}.jsonl   {"id", "kind", "messages", "answer", "reference", ...}: single
                                 user turns plus what the gold judge (minigpt.judge) needs.
    world.json, stats.json       the world itself (and how its facts were split); sizes and counts.

Kinds of question: `passage` (read a short text about made-up people, copy the answer), `fact` (a
world fact, known only from pretraining), `arithmetic` (sums and differences of numbers up to 10),
`instruction` (count a few numbers, greet, name an animal, repeat a word up to four times).
No prompt text is shared by two of the five sets, and the (person, attribute) facts asked in SFT are
disjoint from those asked in ranking / PPO / eval: a held-out fact question tests what pretraining
taught, not what SFT showed.

Determinism: one `random.Random(seed)` drives every choice, in a fixed order; nothing depends on
`hash()` or set iteration, so the same seed gives byte-identical files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from minigpt.config import DataConfig
from minigpt.judge import number_to_words, score
from minigpt.run import write_text_atomic

log = logging.getLogger(__name__)

# -- the mix of everything ---------------------------------------------------------------------------

DOCUMENT_MIX = {"bio": 0.25, "story": 0.16, "conversation": 0.15, "scene": 0.04, "arithmetic": 0.12,
                "counting": 0.04, "place": 0.08, "animal": 0.04, "reading": 0.12}
KIND_MIX = {"passage": 0.35, "fact": 0.30, "arithmetic": 0.20, "instruction": 0.15}
QUALITY_MIX = {"good": 0.50, "verbose": 0.20, "curt": 0.15, "wrong": 0.15}
TWO_TURN_FRACTION = 0.2  # of SFT dialogues that have a follow-up question
SFT_FACT_SHARE = 0.5  # of the (person, attribute) facts asked in SFT; the rest are held out
PROMPT_SETS = ("eval", "ppo", "ranking")  # generated in this order, eval first: it must never go short

# -- the vocabulary of the world ---------------------------------------------------------------------

FEMALE_NAMES = """Mara Anna Bella Clara Daisy Ella Fiona Greta Hanna Ida Julia Kira Lena Maya Nora Paula Rosa
Sara Tara Una Vera Wanda Yara Zoe Alice Beth Cora Dina Edith Freya Gemma Helen Irene Jenny Kate Laura
Mia Nina Orla Petra Ruth Selma Tessa Uma Viola Willa Xenia Zara Agnes Brenda Celia Doris Elsa Flora Gwen
Heidi Isla Jana Lucy Molly Nadia Pia Rhea Stella Thea Vicky Wendy Lotte Mina Edna""".split()
MALE_NAMES = """Tom Sam Ben Dan Eli Finn Gus Hugo Ivan Jake Kai Leo Max Ned Oscar Paul Seth Theo Umar Victor
Walt Yusuf Zack Adam Boris Carl Dev Emil Felix George Harry Igor Jonas Karl Liam Milo Nils Otto Peter Rudy
Simon Toby Ulf Vince Wes Xavier Yann Aron Bruno Colin Dario Ezra Fred Hank Isaac Jasper Kevin Lars Moritz
Noah Omar Pablo Rafael Stefan Tobias Hector Oliver Rupert""".split()

TOWNS = ("Oakfield", "Brookside", "Stonebridge", "Millbrook", "Ashford", "Redhill", "Fernvale", "Windmere",
         "Elmstead", "Harbourton", "Pinecrest", "Lakeside")
LANDMARKS = ("stone bridge", "busy market", "wide river", "old mill", "small harbour", "ruined castle",
             "tall lighthouse", "great oak tree", "marble fountain", "clock tower", "windmill", "quiet lake")
SETTINGS = ("in a green valley", "on a windy hill", "by the sea", "at the edge of a forest", "among rolling fields",
            "beside a slow river", "at the foot of the mountains", "on a sunny plain", "near the marshes",
            "between two hills", "on the banks of a stream", "in a sheltered bay")


@dataclass(frozen=True)
class Job:
    does: str  # what the job does, third person: "bakes bread"
    do: str  # the same, plain: "bake bread"
    did: str  # the same, past: "baked bread"
    workplace: str


JOBS = {
    "baker": Job("bakes bread", "bake bread", "baked bread", "the bakery"),
    "farmer": Job("tends the fields", "tend the fields", "tended the fields", "the fields"),
    "teacher": Job("teaches children", "teach children", "taught the children", "the school"),
    "doctor": Job("looks after sick people", "look after sick people", "looked after sick people", "the clinic"),
    "fisher": Job("catches fish", "catch fish", "caught fish", "the harbour"),
    "painter": Job("paints pictures", "paint pictures", "painted a picture", "the studio"),
    "carpenter": Job("makes tables and chairs", "make tables and chairs", "made a table", "the workshop"),
    "nurse": Job("cares for patients", "care for patients", "cared for patients", "the hospital"),
    "tailor": Job("sews coats and dresses", "sew coats and dresses", "sewed a coat", "the sewing room"),
    "potter": Job("shapes clay into bowls", "shape clay into bowls", "shaped a clay bowl", "the pottery"),
    "gardener": Job("grows flowers", "grow flowers", "planted flowers", "the gardens"),
    "builder": Job("builds houses", "build houses", "built a wall", "the building site"),
    "miller": Job("grinds flour", "grind flour", "ground flour", "the mill"),
    "weaver": Job("weaves cloth", "weave cloth", "wove cloth", "the weaving shed"),
    "blacksmith": Job("shapes iron", "shape iron", "shaped iron", "the forge"),
    "librarian": Job("looks after books", "look after books", "sorted books", "the library"),
}


@dataclass(frozen=True)
class Animal:
    sound: str  # what it says: "woof"
    legs: int
    habitat: str  # a key of HABITATS
    plural: str


ANIMALS = {
    "dog": Animal("woof", 4, "house", "dogs"), "cat": Animal("meow", 4, "house", "cats"),
    "rabbit": Animal("squeak", 4, "house", "rabbits"), "hamster": Animal("squeak", 4, "house", "hamsters"),
    "parrot": Animal("squawk", 2, "house", "parrots"), "tortoise": Animal("hiss", 4, "house", "tortoises"),
    "horse": Animal("neigh", 4, "farm", "horses"), "goat": Animal("maa", 4, "farm", "goats"),
    "pig": Animal("oink", 4, "farm", "pigs"), "cow": Animal("moo", 4, "farm", "cows"),
    "hen": Animal("cluck", 2, "farm", "hens"), "duck": Animal("quack", 2, "pond", "ducks"),
    "frog": Animal("croak", 4, "pond", "frogs"), "fox": Animal("yip", 4, "forest", "foxes"),
    "owl": Animal("hoot", 2, "forest", "owls"), "bear": Animal("growl", 4, "forest", "bears"),
    "deer": Animal("grunt", 4, "forest", "deer"), "whale": Animal("hum", 0, "sea", "whales"),
    "dolphin": Animal("click", 0, "sea", "dolphins"), "seal": Animal("arf", 4, "sea", "seals"),
}
PETS = ("dog", "cat", "rabbit", "hamster", "parrot", "tortoise", "horse", "goat", "duck", "pig")
HABITATS = {"house": "in a house", "farm": "on a farm", "pond": "in a pond", "forest": "in the forest",
            "sea": "in the sea"}
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "grey")
FOODS = ("soup", "cheese", "apples", "honey", "cake", "pie", "rice", "noodles", "pancakes", "porridge",
         "plums", "carrots")
PET_NAMES = """Pip Pepper Whiskers Bramble Clover Dot Fudge Hopper Inky Jelly Kiwi Luna Mittens Nutmeg Patch
Peanut Pickle Pudding Rocket Shadow Sparky Sprout Sunny Taffy Toffee Tumble Waffles Ziggy Bean Blossom
Bubbles Chester Comet Duke Echo Flash Goldie Gizmo Misty Muffin Nibbles Poppy Rusty Scout Smudge Snowy Sooty
Twiggy Velvet Willow Zippy Pebble Barley Cricket Domino Fidget Juniper Maple Pumpkin Quill Ripple Sable
Thistle Tinker Wobble Bingo Cosmo Dusty Biscuit Gumbo Hazel Jasmine Lulu Mocha Button Olive Paddy Rolo""".split()
ATTRIBUTES = ("town", "job", "pet", "pet_name", "colour", "food", "age")
STATEMENTS = ("town", "job", "pet", "colour", "food", "age")  # a pet sentence states its name too
AGE_RANGE = (16, 85)
MIN_PEOPLE = 4

# Reading-comprehension passages are about made-up people with short, ordinary first names - never a
# world person's name, nor one that starts like it (or like another passage name) - living in towns made
# of a few common parts, keeping pets with everyday pet names. Short names and shared parts are frequent
# enough in the pretraining text to be a token or three each, so a small model can copy them; none of
# them is in the world, so the answer can only be read from the passage.
PASSAGE_FEMALE_NAMES = """Abby Amber Amy Bess Bridget Cathy Dora Emma Eve Fay Gail Gina Grace Holly Iris Jade
Jane Jess Jill Joan Josie June Kathy Kay Kelly Kim Lily Louise Marion Martha Mary Nancy Nell Polly Ruby
Sally Sue Tilly Tina Annie Ava Becky Betty Cara Carol Chloe Cleo Connie Diane Ellen Eva Evie Hope Ivy
Jean Joyce Judy Karen Katie Kitty Linda Lisa Liz Lois Mae Maud Norma Rita Susan Tracy""".split()
PASSAGE_MALE_NAMES = """Alan Albert Alfie Andrew Andy Barry Bert Bill Bob Brian Chris Clive Dale Dave Derek Doug
Drew Frank Hal Harold Herb Howard Ian Jack Jerry Jim Joe John Josh Keith Ken Larry Lee Luke Mark Martin Mason
Matt Michael Nathan Nick Phil Ray Richard Rob Rod Roger Ron Roy Sid Stan Steve Terry Tim Wade Abe Alex Archie
Arthur Bart Chad Clay David Eddie Eric Ethan Gary Gene Glen Greg Henry James Jeff Kurt Mike Neil Owen Ralph Ross
Ryan Tony Troy Wayne""".split()
PASSAGE_PET_NAMES = """Spot Chip Rex Tiny Lucky Buddy Teddy Sugar Ginger Cookie Tiger Bandit Berry Storm
Frosty Buster Rocky Nugget Puddle Sparkle Mango Pixie Whisper""".split()
PASSAGE_TOWNS = [start + end for start in ("Sun", "Sand", "Snow", "Gold", "Well", "Fair")
                 for end in ("ford", "wood", "bury", "gate", "ton", "wick")]
PASSAGE_AGE_RANGE = (18, 90)  # grown-ups: they have jobs

# -- the wording: facts, questions and answers ---------------------------------------------------------
# Slots: {n} name, {s}/{o}/{p} she/her/her (he/him/his), {S}/{P} capitalised, {town}, {job}, {a_job},
# {does}, {do}, {workplace}, {animal}, {a_animal}, {pet}, {colour}, {food}, {age}.

FACT_SENTENCES = {
    "town": ["{n} lives in {town}.", "{n} has lived in {town} for many years.", "{n}'s home is in {town}.",
             "{n} comes from {town}.", "You can find {n} in the town of {town}.", "{town} is where {n} lives.",
             "Ask anyone in {town} and they will tell you that {n} lives there.", "{n} makes {p} home in {town}.",
             "In {town}, everyone knows {n}.", "The town of {town} is home to {n}.",
             "{n} would not live anywhere but {town}.", "{n} lives in a small house in {town}."],
    "job": ["{n} is {a_job}.", "{n} works as {a_job}.", "{n} works as {a_job} in {town}.",
            "The {job} {n} {does} every day.", "{n} {does} for a living.", "By trade, {n} is {a_job}.",
            "Ask anyone in {town} and they will tell you {n} {does} for a living.",
            "{n} has been {a_job} since {s} was young.", "Every morning {n} goes to {workplace}, because {s} is {a_job}.",
            "{n}'s job is to {do}.", "People know {n} as a good {job}.", "{n} earns a living as {a_job}."],
    "pet": ["{n} has a pet {animal} called {pet}.", "{n} keeps {a_animal} named {pet}.",
            "{pet} is {n}'s {animal}.", "{n} lives with {a_animal} called {pet}.",
            "The {animal} {pet} belongs to {n}.", "{n} takes good care of {p} {animal}, {pet}.",
            "{n} owns {a_animal}, and its name is {pet}.", "At home, {n} has {a_animal} named {pet}.",
            "{n}'s pet is {a_animal} called {pet}.", "{pet} the {animal} lives with {n}."],
    "colour": ["{n}'s favourite colour is {colour}.", "{n} loves the colour {colour}.",
               "{n} likes {colour} more than any other colour.", "Of all the colours, {n} likes {colour} best.",
               "{n} often wears {colour}, because it is {p} favourite colour.", "The colour {colour} is {n}'s favourite.",
               "If you ask {n}, {s} will say that {colour} is the best colour.",
               "{n} painted {p} front door {colour}, {p} favourite colour.", "{n}'s favourite colour has always been {colour}."],
    "food": ["{n}'s favourite food is {food}.", "{n} loves to eat {food}.", "More than anything, {n} likes to eat {food}.",
             "{n} could eat {food} every day.", "For dinner, {n} always hopes for {food}.",
             "The food {n} likes best is {food}.", "{n} is very fond of {food}.",
             "Nothing makes {n} happier than {food}.", "If you cook {food}, {n} will come to dinner."],
    "age": ["{n} is {age} years old.", "{n} is {age}.", "{n} turned {age} this year.", "{n}'s age is {age}.",
            "{n} has lived for {age} years.", "{n} will tell you that {s} is {age} years old.",
            "{n} is a {job} who is {age} years old.", "At {age} years old, {n} still loves a good walk."],
}

FACT_QUESTIONS = {
    "town": ["Where does {n} live?", "Which town does {n} live in?", "What town is {n} from?", "Where is {n}'s home?",
             "In which town does {n} live?", "Where can I find {n}'s home?", "Which town is home to {n}?",
             "Do you know where {n} lives?", "Tell me where {n} lives.", "What is the name of the town where {n} lives?"],
    "job": ["What does {n} do for a living?", "What is {n}'s job?", "What job does {n} have?", "What work does {n} do?",
            "How does {n} earn a living?", "What is {n}'s trade?", "Tell me what {n} does for work.",
            "Do you know what job {n} has?", "What kind of work does {n} do?", "What does {n} work as?"],
    "pet": ["What pet does {n} have?", "What kind of pet does {n} have?", "What animal does {n} keep as a pet?",
            "What kind of animal is {n}'s pet?", "Which animal lives with {n}?", "Tell me what pet {n} has.",
            "Does {n} have a pet? What kind?", "What sort of animal is {n}'s pet?",
            "Do you know what kind of pet {n} keeps?", "Which animal does {n} look after at home?"],
    "pet_name": ["What is the name of {n}'s {animal}?", "What is {n}'s {animal} called?", "What is {n}'s pet called?",
                 "What did {n} name {p} {animal}?", "What is the name of {n}'s pet?", "Tell me the name of {n}'s {animal}.",
                 "Do you know what {n}'s {animal} is called?", "What name does {n}'s pet have?",
                 "What do people call {n}'s {animal}?", "What is the pet of {n} called?"],
    "colour": ["What is {n}'s favourite colour?", "Which colour does {n} like best?", "What colour does {n} love most?",
               "Tell me {n}'s favourite colour.", "Do you know {n}'s favourite colour?", "Which colour is {n}'s favourite?",
               "What colour does {n} like more than any other?", "What is the favourite colour of {n}?",
               "If {n} could pick a colour, which would it be?", "What colour is {n} fond of?"],
    "food": ["What is {n}'s favourite food?", "What food does {n} like best?", "What does {n} love to eat?",
             "Tell me {n}'s favourite food.", "Do you know {n}'s favourite food?", "Which food is {n}'s favourite?",
             "What does {n} like to eat more than anything?", "What is the favourite food of {n}?",
             "What would {n} choose for dinner?", "What food is {n} fond of?"],
    "age": ["How old is {n}?", "What is {n}'s age?", "How many years old is {n}?", "Tell me how old {n} is.",
            "Do you know how old {n} is?", "What age is {n}?", "How old is {n} now?", "Can you tell me {n}'s age?",
            "How many years has {n} lived?", "What is the age of {n}?"],
}

# A follow-up about the same person, in the second turn of a dialogue (pronouns: only SFT has these).
FOLLOW_UP_QUESTIONS = {
    "town": ["And where does {s} live?", "Which town is {s} from?", "And where is {p} home?"],
    "job": ["And what does {s} do for a living?", "What is {p} job?", "And what work does {s} do?"],
    "pet": ["Does {s} have a pet?", "And what kind of pet does {s} keep?", "What animal does {s} have?"],
    "pet_name": ["And what is {p} {animal} called?", "What is the name of {p} pet?", "What did {s} name {p} {animal}?"],
    "colour": ["And what is {p} favourite colour?", "Which colour does {s} like best?"],
    "food": ["And what is {p} favourite food?", "What does {s} like to eat most?"],
    "age": ["And how old is {s}?", "How old is {s}?", "What is {p} age?"],
}

# The first of each list is the reference answer.
GOOD_ANSWERS = {
    "town": ["{n} lives in {town}.", "{n} lives in the town of {town}.", "{n}'s home is in {town}.", "{n} is from {town}."],
    "job": ["{n} is {a_job}.", "{n} works as {a_job}.", "{n} is {a_job} by trade."],
    "pet": ["{n} has {a_animal}.", "{n} has a pet {animal}.", "{n} keeps {a_animal} as a pet.", "{n}'s pet is {a_animal}."],
    "pet_name": ["{n}'s {animal} is called {pet}.", "{n}'s pet is named {pet}.", "The name of {n}'s {animal} is {pet}.",
                 "{n} calls {p} {animal} {pet}."],
    "colour": ["{n}'s favourite colour is {colour}.", "{n} likes {colour} best.", "{n} loves the colour {colour}."],
    "food": ["{n}'s favourite food is {food}.", "{n} likes {food} best.", "{n} loves to eat {food}."],
    "age": ["{n} is {age} years old.", "{n} is {age}.", "{n}'s age is {age}."],
}

# In-prose conversations: a person asked about themselves answers in the first person.
SELF_QUESTIONS = {
    "town": ["Where do you live, {n}?", "Which town do you live in?", "Where is your home, {n}?", "What town are you from?"],
    "job": ["What do you do for a living, {n}?", "What is your job?", "What work do you do?", "{n}, what is your trade?"],
    "pet": ["Do you have a pet, {n}?", "What kind of pet do you have?", "What animal do you keep at home?"],
    "pet_name": ["What is your {animal} called?", "What is the name of your {animal}, {n}?", "What did you name your {animal}?"],
    "colour": ["What is your favourite colour, {n}?", "Which colour do you like best?", "What colour do you love most?"],
    "food": ["What is your favourite food?", "What do you like to eat most, {n}?", "Which food do you love best?"],
    "age": ["How old are you, {n}?", "May I ask how old you are?", "What is your age, {n}?"],
}
SELF_ANSWERS = {
    "town": ["I live in {town}.", "In {town}.", "My home is in {town}.", "I am from {town}."],
    "job": ["I am {a_job}.", "I work as {a_job}.", "I {do} for a living.", "I am {a_job}, so I {do} every day."],
    "pet": ["I have {a_animal} called {pet}.", "Yes, {a_animal} named {pet}.", "I keep {a_animal}. Its name is {pet}."],
    "pet_name": ["My {animal} is called {pet}.", "{pet}.", "I named my {animal} {pet}."],
    "colour": ["My favourite colour is {colour}.", "I like {colour} best.", "I love {colour}, of course."],
    "food": ["My favourite food is {food}.", "I love {food}.", "I could eat {food} every day."],
    "age": ["I am {age} years old.", "I am {age}.", "I turned {age} this year."],
}
CONVERSATION_LINES = [  # {q} a question, {a} its answer (", " form when a "said" follows), {x} asks, {y} answers
    '"{q}" asked {x}. "{a_said}" said {y}.',
    '{x} asked, "{q}" {y} answered, "{a}"',
    '"{q}" {x} wanted to know. "{a_said}" {y} replied.',
    '{x} turned to {y}. "{q}" she asked. "{a_said}" said {y}.',
    '"{q}" said {x}. {y} smiled. "{a}"',
]

VERBOSE_OPENERS = ["That is a great question!", "What a lovely question!", "Sure, I would be happy to help with that.",
                   "Let me think about this for a moment.", "Good question, let me help.", "Of course, I can answer that.",
                   "Thank you for asking!", "Ah, I know this!", "Happy to help with this."]
VERBOSE_MIDDLES = ["I am quite sure about this.", "I remember this very well.", "It is an easy thing to remember.",
                   "I have thought about it carefully."]
VERBOSE_CLOSERS = ["I hope this helps you!", "Let me know if you have any other questions.",
                   "Is there anything else you would like to know?", "Feel free to ask me anything else.",
                   "Have a wonderful day!", "I am always glad to help.", "Thanks again for the question!"]

PASSAGE_PROMPTS = ["Read the passage and answer the question.\n\n{passage}\n\nQuestion: {question}",
                   "{passage}\n\n{question}", "Here is a short text:\n{passage}\n{question}",
                   "Passage: {passage}\nQuestion: {question}", "{passage} {question}",
                   "Please read this. {passage}\nNow answer: {question}",
                   "Use the text below to answer.\n{passage}\n{question}"]
# Pretraining's reading lessons: a passage, then one to three questions about it, each answered in a full
# sentence restating the question's subject - the skill a passage prompt asks for, taught in prose.
READING_OPENINGS = ["Read the passage and answer the questions.\n\n{passage}\n\n", "{passage}\n\n",
                    "Here is a short text:\n{passage}\n", "Passage: {passage}\n", "{passage} ",
                    "Please read this. {passage}\n", "A reading lesson. {passage}\n",
                    "The teacher read a little story to the class. \"{passage}\" Then she asked some questions.\n"]
READING_ANSWERS = ["Question: {q}\nAnswer: {a}", "Q: {q}\nA: {a}", "{q} {a}",
                   "\"{q_said}\" asked the teacher. \"{a_said}\" said one of the children.",
                   "{q} The text tells us: {a}", "If someone asks \"{q}\", the answer is: {a}"]
FOLLOW_UP_OPENERS = ["Thanks! ", "Great. ", "Good, one more: ", "Now another task: ", "Well done. "]

PLUS_QUESTIONS = ["What is {a} plus {b}?", "How much is {a} plus {b}?", "What do you get when you add {a} and {b}?",
                  "What is the sum of {a} and {b}?", "Can you add {a} and {b}?", "What is {a} + {b}?", "Add {a} and {b}.",
                  "Please work out {a} plus {b}.", "What does {a} plus {b} make?"]
MINUS_QUESTIONS = ["What is {a} minus {b}?", "How much is {a} minus {b}?", "What is {a} take away {b}?",
                   "What do you get when you take {b} from {a}?", "Subtract {b} from {a}.", "What is {a} - {b}?",
                   "Can you work out {a} minus {b}?", "What is left if you take {b} away from {a}?"]
PLUS_ANSWERS = ["{a} plus {b} is {r}.", "{a} plus {b} equals {r}.", "{a} plus {b} makes {r}.", "The sum of {a} and {b} is {r}."]
MINUS_ANSWERS = ["{a} minus {b} is {r}.", "{a} minus {b} equals {r}.", "{a} take away {b} leaves {r}."]
STORY_SUMS = [  # (question, good answer); {things} are countable objects
    ("{n} has {a} {things}. {S} finds {b} more. How many {things} does {n} have now?", "{n} has {r} {things} now."),
    ("{n} picked {a} {things} in the morning and {b} in the afternoon. How many {things} did {n} pick in all?",
     "{n} picked {r} {things} in all."),
    ("There are {a} {things} in a box and {n} puts in {b} more. How many {things} are in the box?",
     "There are {r} {things} in the box."),
]
STORY_DIFFERENCES = [
    ("{n} had {a} {things} and gave away {b}. How many {things} does {n} have left?", "{n} has {r} {things} left."),
    ("There were {a} {things} on the table. {n} took {b} of them. How many {things} are still on the table?",
     "There are {r} {things} still on the table."),
    ("{n} had {a} {things} and lost {b} on the way home. How many {things} does {n} have now?",
     "{n} has {r} {things} now."),
]
ARITHMETIC_FOLLOW_UPS = {"plus": ["And what is that plus {c}?", "Now add {c} to that.", "And if you add {c} more?"],
                         "minus": ["And what is that minus {c}?", "Now take away {c}. What is left?",
                                   "And if you take away {c}?"]}
THINGS = ("marbles", "shells", "stones", "eggs", "coins", "books", "pencils", "flowers", "cups", "stamps", "cards",
          "feathers", "ribbons", "candles", "spoons", "kites")

COUNT_INSTRUCTIONS = ["Count from {a} to {b}.", "Please count from {a} to {b}.", "Can you count from {a} up to {b}?",
                      "List the numbers from {a} to {b}.", "Count up from {a} to {b}, please.",
                      "Write the numbers from {a} to {b} in order.", "Say the numbers from {a} to {b}."]
COUNT_ANSWERS = ["Counting from {a} to {b}: {sequence}.", "Here are the numbers from {a} to {b}: {sequence}.",
                 "Sure: {sequence}.", "Here you go: {sequence}."]
GREET_INSTRUCTIONS = ["Say hello to {n}.", "Please greet {n}.", "Greet {n} for me.", "Can you say hi to {n}?",
                      "Say a friendly hello to {n}.", "Please say hello to my friend {n}.", "Give {n} a warm greeting."]
GREET_ANSWERS = ["Hello, {n}!", "Hi, {n}!", "Hello there, {n}!", "Hey, {n}!"]
ANIMAL_INSTRUCTIONS = ["Name an animal that lives {where}.", "Tell me an animal that lives {where}.",
                       "Which animal lives {where}?", "Can you name an animal found {where}?",
                       "Give me an example of an animal that lives {where}.", "What is an animal that lives {where}?",
                       "Name a creature that lives {where}."]
ANIMAL_ANSWERS = ["{A_animal} lives {where}.", "The {animal} lives {where}.", "{A_animal} is an animal that lives {where}."]
REPEAT_INSTRUCTIONS = ["Repeat the word {w} {k} times.", "Say the word {w} {k} times.", "Please write {w} {k} times.",
                       "Can you repeat '{w}' {k} times?", "Write the word {w} {k} times in a row.", "Say '{w}' {k} times."]
REPEAT_WORDS = ("river", "moon", "tree", "stone", "cloud", "star", "boat", "lamp", "bell", "door", "window", "garden",
                "sun", "rain", "leaf", "hill", "road", "basket", "candle", "ladder", "kettle", "mountain", "blanket",
                "teapot", "feather", "hat", "shoe", "bridge", "bucket", "song")
INSTRUCTION_TASKS = ("count", "greet", "name_animal", "repeat")

# Scenery for stories and bios: the words that fill a BPE vocabulary beyond the facts.
TIME_OPENINGS = ["Early one morning", "One bright afternoon", "Late in the evening", "On a quiet Sunday", "At dawn",
                 "Just after lunch", "One autumn day", "On the first day of spring", "In the middle of winter",
                 "One summer evening", "Before breakfast", "On a Monday morning", "At the end of a long week",
                 "One cold night", "On market day"]
WEATHER = ["the sun was shining", "it was raining softly", "a cold wind was blowing", "thick fog covered the streets",
           "snow was falling", "the sky was clear", "dark clouds were gathering", "it was warm and still",
           "a light drizzle was falling", "the air smelled of rain", "frost sparkled on the grass", "a storm was coming",
           "the birds were singing", "the leaves were falling"]
FEELINGS = ["happy", "tired", "cheerful", "proud", "calm", "excited", "sleepy", "curious", "grateful", "content",
            "hungry", "thoughtful", "pleased", "relaxed", "surprised"]
TRAITS = ["kind", "cheerful", "patient", "clever", "quiet", "friendly", "careful", "brave", "generous", "gentle",
          "busy", "honest", "funny", "curious", "shy", "lively", "thoughtful", "hard-working", "polite", "calm"]
HOBBIES = ["reads books in the evening", "enjoys long walks", "sings while working", "writes letters to old friends",
           "watches the birds in the garden", "likes to sit by the fire", "plays cards with the neighbours",
           "tells funny stories", "gets up before sunrise", "keeps a small vegetable patch", "collects smooth stones",
           "draws pictures of the hills", "plays the fiddle on Fridays", "swims in the lake in summer",
           "knits warm scarves for winter", "carves little wooden toys", "looks at the stars at night"]
CHORES = ["swept the floor", "mended a broken chair", "wrote a letter", "tidied the kitchen", "fixed the garden gate",
          "read a few pages of a book", "fetched water from the well", "hung the washing out to dry",
          "chopped wood for the fire", "watered the plants", "sang a little song", "drew a map of the town"]
CLOTHES = ["scarf", "coat", "hat", "jumper", "cap", "cloak", "shirt", "waistcoat", "pair of gloves", "pair of boots"]
SEASONS = {"spring": "the first flowers open", "summer": "the days are long and warm",
           "autumn": "the leaves turn and fall", "winter": "the nights are long and cold"}

# Things and doings for scenes: many plain words, none of them a fact of the world (no colour, food,
# animal, job, town or name), so they widen the vocabulary without blurring what the model must learn.
OBJECTS = """lantern kettle basket ladder bucket blanket candle teapot jug spoon fork knife plate cup mug saucer shelf
drawer cupboard chest trunk box parcel letter envelope map compass clock watch mirror comb broom rake spade
shovel hammer saw nail rope string needle thread ribbon umbrella boot sock belt bag satchel purse wallet key
lock chain bell whistle drum fiddle flute harp violin trumpet book notebook pencil pen ink paper diary journal
calendar chair table stool bench bed pillow curtain carpet rug window door gate fence roof chimney staircase
porch balcony attic cellar barn shed well pump cart wagon wheel barrel crate sack jar bottle flask tray pan
pot stove lamp torch kite ball puzzle toy doll boat oar sail anchor net hook cushion quilt apron thimble
teacup vase jigsaw sledge wheelbarrow shutter doorknob padlock hinge cradle rocking-chair spinning-top
hourglass telescope lens locket bracelet necklace brooch medal trophy banner flag postcard stamp
newspaper magazine poster painting sketch portrait album scrapbook recipe""".split()
ADJECTIVES = """old new little tiny huge heavy light soft hard smooth rough shiny wooden iron copper brass silver golden
crooked straight narrow wide tall short round square empty full warm cool damp dry bright dim quiet noisy
ancient tidy messy broken clean polished battered sturdy fragile lovely plain fancy woollen leather painted
striped spotted faded cracked gleaming creaky cosy crisp fresh stale sticky fluffy cheap precious strange
peculiar enormous delicate sharp blunt hollow slender shabby elegant rickety handsome curious mysterious
forgotten borrowed dented chipped speckled glossy velvety lumpy wobbly sparkling well-worn handmade homemade
spotless tattered""".split()
MOVING = """creaked rattled glittered swayed shone dripped flickered glowed rustled clattered hummed ticked tumbled
rolled wobbled trembled shimmered sparkled dangled leaned rested waited stood lay fell floated drifted spun
buzzed chimed tinkled banged slammed fluttered steamed smoked gleamed twinkled jingled thudded""".split()
HANDLED = """polished carried mended opened closed folded cleaned found dropped lifted wrapped tied untied sorted
stacked dusted fixed borrowed returned hid packed unpacked filled emptied washed dried weighed measured
sharpened oiled brushed admired inspected repaired decorated hung moved dragged pushed pulled shook
straightened tidied labelled""".split()
ROOMS = """kitchen hallway garden window door gate fence shed attic cellar porch stairs fireplace well road
square meadow bridge stream pantry workshop parlour bedroom corridor courtyard veranda doorway orchard
greenhouse alley marketplace churchyard schoolyard lane""".split()
ADVERBS = """slowly quickly gently softly loudly quietly suddenly happily carefully lazily sleepily brightly steadily
merrily proudly silently noisily gracefully clumsily cheerfully patiently eagerly nervously boldly
politely calmly kindly gladly""".split()
PERSON_VERBS = """hummed whistled yawned stretched laughed giggled sighed nodded waved shrugged wandered strolled hurried
rushed tiptoed skipped marched climbed jumped rested napped dozed listened wondered remembered forgot
whispered shouted knocked chuckled grinned frowned blinked shivered paused""".split()
SMELLS = ["woodsmoke", "wet earth", "fresh paint", "pine needles", "warm wax", "lavender", "cut grass",
          "sea salt", "old paper", "polish", "roses after rain", "coffee", "toast", "wild mint", "hot tea"]
SOUNDS = ["knock", "whistle", "thump", "crash", "rustle", "giggle", "chime", "clatter", "creak", "tapping",
          "humming", "splash", "bang", "rumble", "patter"]
TREES = ["oak", "elm", "pine", "birch", "beech", "ash", "cherry", "chestnut", "poplar", "yew", "alder", "sycamore"]
STORY_ENDINGS = ["When evening came, {n} walked home to {town}, feeling {feeling}.",
                 "That night {n} slept well, tired but {feeling}.", "It had been a good day, and {n} felt {feeling}.",
                 "Later, {n} sat by the window and smiled.", "By the time the stars came out, {n} was back home."]


# -- the world ----------------------------------------------------------------------------------------

@dataclass
class Person:
    name: str
    gender: str  # "female" | "male": only for pronouns
    town: str
    job: str
    pet: str  # the kind of animal
    pet_name: str
    colour: str
    food: str
    age: int


@dataclass
class Place:
    name: str
    landmark: str
    setting: str


@dataclass
class World:
    people: list[Person]
    places: list[Place]

    def person(self, name: str) -> Person:
        return next(p for p in self.people if p.name == name)


def build_world(n_people: int, rng: random.Random) -> World:
    """Draw the people and places; which person has which attribute is the seed's choice."""
    named = [(n, "female") for n in FEMALE_NAMES] + [(n, "male") for n in MALE_NAMES]
    if not MIN_PEOPLE <= n_people <= len(named):
        raise ValueError(f"DataConfig.n_people={n_people}: the world needs {MIN_PEOPLE} to {len(named)} people "
                         f"(stories need a friend and a third person; there are {len(named)} first names)")
    pet_names = rng.sample(PET_NAMES, min(n_people, len(PET_NAMES)))
    pet_names += rng.choices(PET_NAMES, k=n_people - len(pet_names))  # repeats only past the list's size
    people = [Person(name=name, gender=gender, town=rng.choice(TOWNS), job=rng.choice(sorted(JOBS)),
                     pet=rng.choice(PETS), pet_name=pet_name, colour=rng.choice(COLOURS), food=rng.choice(FOODS),
                     age=rng.randint(*AGE_RANGE))
              for (name, gender), pet_name in zip(rng.sample(named, n_people), pet_names)]
    landmarks, settings = rng.sample(LANDMARKS, len(TOWNS)), rng.sample(SETTINGS, len(TOWNS))
    places = [Place(town, landmark, setting) for town, landmark, setting in zip(TOWNS, landmarks, settings)]
    return World(people, places)


def article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def slots(person: Person, rng: random.Random | None = None) -> dict:
    """Every template slot for one person; with `rng`, the age is sometimes spelled in words."""
    female = person.gender == "female"
    job = JOBS[person.job]
    age = str(person.age)
    if rng is not None and rng.random() < 0.25:
        age = number_to_words(person.age)
    return {"n": person.name, "s": "she" if female else "he", "o": "her" if female else "him",
            "p": "her" if female else "his", "S": "She" if female else "He", "P": "Her" if female else "His",
            "town": person.town, "job": person.job, "a_job": article(person.job), "does": job.does, "do": job.do,
            "did": job.did, "workplace": job.workplace, "animal": person.pet, "a_animal": article(person.pet),
            "pet": person.pet_name, "colour": person.colour, "food": person.food, "age": age}


SLOT_ATTRIBUTE = {"town": "town", "job": "job", "a_job": "job", "does": "job", "do": "job", "did": "job",
                  "workplace": "job", "animal": "pet", "a_animal": "pet", "pet": "pet_name", "colour": "colour",
                  "food": "food", "age": "age"}


def stated_attributes(template: str) -> set[str]:
    """The attributes a template states: the ones whose slots it fills."""
    return {SLOT_ATTRIBUTE[name] for _, name, _, _ in string.Formatter().parse(template) if name in SLOT_ATTRIBUTE}


def fact_sentence(attribute: str, person: Person, rng: random.Random, pronoun: bool = False) -> tuple[str, set]:
    """One sentence stating `attribute` of `person` (a random phrasing) and every attribute it states."""
    templates = FACT_SENTENCES[attribute]
    if pronoun:  # only phrasings that open on the name read well with "She"/"He" instead
        templates = [t for t in templates if t.startswith("{n}") and t.count("{n}") == 1]
    template = rng.choice(templates)
    if pronoun:
        template = "{P}" + template[len("{n}'s"):] if template.startswith("{n}'s") else "{S}" + template[len("{n}"):]
    return template.format(**slots(person, rng)), stated_attributes(template)


def plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def scenery(rng: random.Random, name: str) -> str:
    """One sentence of scenery: objects, rooms, sounds and smells; `name` is someone in the scene."""
    adjective, thing, room = rng.choice(ADJECTIVES), rng.choice(OBJECTS), rng.choice(ROOMS)
    forms = [lambda: f"The {adjective} {thing} {rng.choice(MOVING)} {rng.choice(ADVERBS)} by the {room}.",
             lambda: f"Someone had left {article(adjective)} {thing} near the {room}.",
             lambda: f"{name} {rng.choice(HANDLED)} the {adjective} {thing} and took it to the {room}.",
             lambda: f"Outside, the {rng.choice(TREES)} trees {rng.choice(['swayed', 'rustled', 'creaked', 'trembled'])} in the wind.",
             lambda: f"The smell of {rng.choice(SMELLS)} drifted through the {room}.",
             lambda: f"{rng.choice(ADVERBS).capitalize()}, a {rng.choice(SOUNDS)} came from the {room}.",
             lambda: f"{name} {rng.choice(PERSON_VERBS)} and looked at the {adjective} {thing}.",
             lambda: "On the shelf stood " + join_names([article(rng.choice(ADJECTIVES)) + " " + t
                                                         for t in rng.sample(OBJECTS, 3)]) + ".",
             lambda: f"At a stall, a trader was selling {adjective} {plural(thing)} and {rng.choice(ADJECTIVES)} "
                     f"{plural(rng.choice(OBJECTS))}.",
             lambda: f"{name} {rng.choice(PERSON_VERBS)} {rng.choice(ADVERBS)} on the way to the {room}."]
    return rng.choice(forms)()


def join_names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def spell(n: int, rng: random.Random, words_share: float) -> str:
    """A number in digits, or in words with probability `words_share`."""
    return number_to_words(n) if rng.random() < words_share else str(n)


def allocation(n: int, mix: dict) -> dict:
    """How many of `n` items each label of `mix` gets: its exact share, remainders to the largest."""
    raw = {label: n * share / sum(mix.values()) for label, share in mix.items()}
    counts = {label: int(value) for label, value in raw.items()}
    by_remainder = sorted(mix, key=lambda label: raw[label] - counts[label], reverse=True)
    for label in by_remainder[:n - sum(counts.values())]:
        counts[label] += 1
    return counts


def allocate(n: int, mix: dict, rng: random.Random) -> list:
    """`n` labels in the exact proportions of `mix`, shuffled."""
    labels = [label for label, count in allocation(n, mix).items() for _ in range(count)]
    rng.shuffle(labels)
    return labels


# -- passages and small sums: shared by pretraining documents and questions --------------------------------

# The phrasings that state their attribute and nothing else, so a passage states each fact exactly once,
# and that name the answer (not "{n} bakes bread", which leaves "baker" to be guessed).
PASSAGE_SENTENCES = {attribute: [t for t in templates if stated_attributes(t) == stated_attributes(templates[0])
                                 and (attribute != "job" or "job}" in t)]
                     for attribute, templates in FACT_SENTENCES.items()}


def write_passage(rng: random.Random) -> dict:
    """A short text about two made-up people: 2-3 facts about the main one (the one a first question asks
    about) and 1-2 about the other - half the time the same kind of fact, as a distractor - in a random
    order. 3-5 sentences, each fact stated once.

    Returns {"text", "people": [main, other], "askable": [(person, attribute)...] every stated fact,
    "main_askable": the main person's, "stated": {attribute: [values stated]}}."""
    named = [(n, "female") for n in PASSAGE_FEMALE_NAMES] + [(n, "male") for n in PASSAGE_MALE_NAMES]
    values = zip(rng.sample(named, 2), rng.sample(PASSAGE_TOWNS, 2), rng.sample(sorted(JOBS), 2),
                 rng.sample(PETS, 2), rng.sample(PASSAGE_PET_NAMES, 2), rng.sample(COLOURS, 2),
                 rng.sample(FOODS, 2), rng.sample(range(PASSAGE_AGE_RANGE[0], PASSAGE_AGE_RANGE[1] + 1), 2))
    main, other = [Person(name=name, gender=gender, town=town, job=job, pet=pet, pet_name=pet_name, colour=colour,
                          food=food, age=age)
                   for (name, gender), town, job, pet, pet_name, colour, food, age in values]
    main_attributes = rng.sample(STATEMENTS, rng.choice([2, 3]))
    n_other = rng.choice([1, 2])
    if rng.random() < 0.5:  # the other person answers the same kind of question: the name must be read too
        shared = rng.choice(main_attributes)
        other_attributes = [shared] + rng.sample([a for a in STATEMENTS if a != shared], n_other - 1)
    else:
        other_attributes = rng.sample(STATEMENTS, n_other)
    statements = [(main, a) for a in main_attributes] + [(other, a) for a in other_attributes]
    rng.shuffle(statements)  # every sentence names its person: the order carries no hint
    sentences, askable, stated = [], [], {}
    for person, attribute in statements:
        template = rng.choice(PASSAGE_SENTENCES[attribute])
        sentences.append(template.format(**slots(person)))  # ages in digits: copied, never converted
        for fact in sorted(stated_attributes(template)):  # a pet sentence states the pet's name too
            askable.append((person, fact))
            stated.setdefault(fact, []).append(_value(person, fact))
    return {"text": " ".join(sentences), "people": [main, other], "askable": askable,
            "main_askable": [(person, a) for person, a in askable if person is main], "stated": stated}


SMALL_OPERANDS = (0, 10)  # arithmetic prompts: sums up to 20, differences never below 0


def small_problem(rng: random.Random, op: str, lowest: int = SMALL_OPERANDS[0]) -> tuple[int, int, int]:
    """(a, b, result) of a sum or difference of two numbers in lowest..10; the result is never below
    `lowest` either (a story's "2 marbles left" reads better than "0 marbles")."""
    while True:
        a, b = rng.randint(lowest, SMALL_OPERANDS[1]), rng.randint(lowest, SMALL_OPERANDS[1])
        if op == "minus" and b > a:
            a, b = b, a
        result = a + b if op == "plus" else a - b
        if result >= lowest:
            return a, b, result


def sum_sentence(op: str, a: int, b: int, r: int, rng: random.Random, person: Person) -> str:
    """`a op b = r` written out, in one of many phrasings (some as a chat question and its answer)."""
    s, thing = slots(person), rng.choice(THINGS)
    words_a, words_b, words_r = number_to_words(a), number_to_words(b), number_to_words(r)
    if op == "plus":
        question, answer = rng.choice(PLUS_QUESTIONS), rng.choice(PLUS_ANSWERS)
        story_question, story_answer = rng.choice(STORY_SUMS)
        forms = [f"{a} plus {b} is {r}.", f"{words_a.capitalize()} plus {words_b} makes {words_r}.",
                 f"If you add {a} and {b}, you get {r}.", f"{a} + {b} = {r}.", f"{a} and {b} make {r}.",
                 f"The sum of {a} and {b} is {r}.", f"{words_a.capitalize()} and {words_b} is {words_r}."]
    else:
        question, answer = rng.choice(MINUS_QUESTIONS), rng.choice(MINUS_ANSWERS)
        story_question, story_answer = rng.choice(STORY_DIFFERENCES)
        forms = [f"{a} minus {b} is {r}.", f"{words_a.capitalize()} take away {words_b} leaves {words_r}.",
                 f"If you take {b} from {a}, you get {r}.", f"{a} - {b} = {r}.", f"{a} take away {b} is {r}.",
                 f"{words_a.capitalize()} minus {words_b} is {words_r}."]
    if rng.random() < 0.3:  # the chat's question and answer, in prose: the most direct lesson for SFT
        return question.format(a=spell(a, rng, 0.25), b=spell(b, rng, 0.25)) + " " + answer.format(a=a, b=b, r=r)
    if min(a, b, r) >= 2:  # stories count things: "1 marbles" would teach bad English
        values = {**s, "things": thing}
        forms.append(story_question.format(a=a, b=b, **values) + " " + story_answer.format(r=r, **values))
        forms.append(f"{person.name} had {a} {thing} and found {b} more, so {s['s']} had {r} {thing}." if op == "plus"
                     else f"{person.name} had {a} {thing} and gave away {b}, so {s['s']} had {r} left.")
    return rng.choice(forms)


# -- pretraining documents ----------------------------------------------------------------------------

class DocumentWriter:
    """Writes pretraining documents about one world, counting how often each fact is stated."""

    def __init__(self, world: World, rng: random.Random):
        self.world, self.rng = world, rng
        self.mentions = Counter()  # (name, attribute) -> sentences stating it
        self.passages: set[str] = set()  # reading passages written, so no prompt reuses one
        self._queue: list[Person] = []

    def next_person(self, exclude: Person | None = None) -> Person:
        """People in a shuffled round robin, so every person's facts are stated about equally often."""
        while True:
            if not self._queue:
                self._queue = self.rng.sample(self.world.people, len(self.world.people))
            allowed = [i for i, person in enumerate(self._queue) if person is not exclude]
            if allowed:
                return self._queue.pop(allowed[-1])
            self._queue += self.rng.sample(self.world.people, len(self.world.people))  # only `exclude` was left

    def fact(self, attribute: str, person: Person, pronoun: bool = False) -> str:
        text, stated = fact_sentence(attribute, person, self.rng, pronoun)
        for name in stated:
            self.mentions[person.name, name] += 1
        return text

    def write(self, kind: str) -> str:
        return getattr(self, kind)()

    def bio(self) -> str:
        rng, person = self.rng, self.next_person()
        s = slots(person)
        woman_or_man = "woman" if person.gender == "female" else "man"
        intros = [f"This is {person.name}.", f"Let me tell you about {person.name}.",
                  f"{person.name} is a {rng.choice(TRAITS)} {woman_or_man}.", f"Here are a few things about {person.name}.",
                  f"Everyone who meets {person.name} says {s['s']} is {rng.choice(TRAITS)}.",
                  f"Have you heard of {person.name}?", f"People often talk about {person.name}.",
                  f"There is a {rng.choice(TRAITS)} {woman_or_man} called {person.name}."]
        sentences = [rng.choice(intros)]
        for i, attribute in enumerate(rng.sample(STATEMENTS, rng.randint(3, 6))):
            sentences.append(self.fact(attribute, person, pronoun=i > 0 and rng.random() < 0.35))
            if rng.random() < 0.3:
                sentences.append(self.filler(person))
            elif rng.random() < 0.15:
                sentences.append(scenery(rng, person.name))
        if rng.random() < 0.5:
            closings = [f"That is all about {person.name} for now.",
                        f"Everyone agrees that {person.name} is a {rng.choice(TRAITS)} neighbour.",
                        f"And that is {person.name}.", f"{s['S']} is happy with {s['p']} life."]
            sentences.append(rng.choice(closings))
        return " ".join(sentences)

    def filler(self, person: Person) -> str:
        rng, s = self.rng, slots(person)
        season = rng.choice(sorted(SEASONS))
        fillers = [f"{s['S']} {rng.choice(HOBBIES)}.", f"{person.name} also {rng.choice(HOBBIES)}.",
                   f"{s['S']} likes {season} best, when {SEASONS[season]}.",
                   f"Friends say {s['s']} is {rng.choice(TRAITS)} and {rng.choice(TRAITS)}.",
                   f"On most days {s['s']} feels {rng.choice(FEELINGS)}."]
        return rng.choice(fillers)

    def story(self) -> str:
        rng = self.rng
        hero = self.next_person()
        friend = self.next_person(exclude=hero)
        h, f = slots(hero), slots(friend)
        n = hero.name
        sentences = [rng.choice([f"{rng.choice(TIME_OPENINGS)} in {hero.town}, {rng.choice(WEATHER)}.",
                                 f"{rng.choice(TIME_OPENINGS)}, {n} woke up in {h['p']} house in {hero.town}.",
                                 f"It was a day like any other in {hero.town}, and {rng.choice(WEATHER)}."])]
        if n in sentences[0]:  # the other openings name the town but not whose it is
            self.mentions[n, "town"] += 1
        sentences.append(rng.choice([f"{n} went to {h['workplace']} and {h['did']}, as {h['s']} does every day, being {h['a_job']}.",
                                     f"Because {n} is {h['a_job']}, {h['s']} {h['did']} all morning.",
                                     f"As usual, the {hero.job} {n} {h['did']} at {h['workplace']}."]))
        self.mentions[n, "job"] += 1
        if rng.random() < 0.8:
            sound = ANIMALS[hero.pet].sound
            sentences.append(rng.choice([f"{h['pet']}, {h['p']} {hero.pet}, followed {h['o']} and said \"{sound}\".",
                                         f"At home, {h['pet']} the {hero.pet} was waiting for {h['o']}.",
                                         f"{n} gave {h['p']} {hero.pet} {h['pet']} something to eat.",
                                         f"{n}'s {hero.pet}, {h['pet']}, had been asleep all day."]))
            self.mentions[n, "pet"] += 1
            self.mentions[n, "pet_name"] += 1
        if rng.random() < 0.5:
            sentences.append(f"{h['S']} {rng.choice(CHORES)} and felt {rng.choice(FEELINGS)}.")
        for _ in range(rng.choice([0, 1, 1, 2])):
            sentences.append(scenery(rng, n))
        place = next(p for p in self.world.places if p.name == hero.town)
        if rng.random() < 0.4:
            sentences.append(f"On the way, {h['s']} walked past the {place.landmark} of {hero.town}.")
        sentences.append(rng.choice([f"Later, {n} met {friend.name}, {f['a_job']} from {friend.town}.",
                                     f"In the afternoon {friend.name} came to visit. {friend.name} lives in {friend.town} and works as {f['a_job']}.",
                                     f"Then {n} bumped into {friend.name} the {friend.job}, who had come all the way from {friend.town}."]))
        self.mentions[friend.name, "town"] += 1
        self.mentions[friend.name, "job"] += 1
        if rng.random() < 0.6:
            text, whose = rng.choice([
                (f"They shared some {hero.food}, because {n}'s favourite food is {hero.food}.", hero),
                (f"{n} made {hero.food} for them both, as it is the food {h['s']} likes best.", hero),
                (f"{friend.name} had brought {friend.food}, {f['p']} favourite food, and they ate it together.", friend)])
            sentences.append(text)
            self.mentions[whose.name, "food"] += 1
        if rng.random() < 0.6:
            clothes = rng.choice(CLOTHES)
            text, whose = rng.choice([
                (f"{n} wore {h['p']} {hero.colour} {clothes}, since {hero.colour} is {h['p']} favourite colour.", hero),
                (f"{friend.name} noticed that {n} was wearing {hero.colour} again. \"It is my favourite colour,\" said {n}.", hero),
                (f"{friend.name} was wearing a {friend.colour} {clothes}, because {friend.colour} is {f['p']} favourite colour.", friend)])
            sentences.append(text)
            self.mentions[whose.name, "colour"] += 1
        if rng.random() < 0.3:
            sentences.append(f"{friend.name} talked about {f['p']} {friend.pet}, {f['pet']}, who is always getting into trouble.")
            self.mentions[friend.name, "pet"] += 1
            self.mentions[friend.name, "pet_name"] += 1
        if rng.random() < 0.3:
            sentences.append(rng.choice([f"\"I am {h['age']} years old and I still love days like this,\" said {n}.",
                                         f"{friend.name} could hardly believe that {n} was already {hero.age}."]))
            self.mentions[n, "age"] += 1
        sentences.append(rng.choice(STORY_ENDINGS).format(n=n, town=hero.town, feeling=rng.choice(FEELINGS)))
        return " ".join(sentences)

    def conversation(self) -> str:
        rng = self.rng
        first = self.next_person()
        second = self.next_person(exclude=first)
        third = None
        if rng.random() < 0.5 and len(self.world.people) > 2:
            third = rng.choice([p for p in self.world.people if p is not first and p is not second])
        meetings = [f"{first.name} met {second.name} {rng.choice(['at the market', 'by the well', 'on the road', 'in the park', 'at a party', 'outside the library'])}.",
                    f"{rng.choice(TIME_OPENINGS)}, {first.name} and {second.name} sat down to talk.",
                    f"{first.name} and {second.name} were waiting for the coach, and {rng.choice(WEATHER)}."]
        lines, asked = [rng.choice(meetings)], set()
        for _ in range(rng.randint(2, 4)):
            asker, answerer = (first, second) if rng.random() < 0.5 else (second, first)
            about_third = third is not None and rng.random() < 0.4
            attribute = rng.choice([a for a in ATTRIBUTES if ((third if about_third else answerer).name, a) not in asked])
            if about_third:
                subject = third  # a question about someone else: the chat pattern, in prose
                question = rng.choice(FACT_QUESTIONS[attribute]).format(**slots(subject))
                answer = rng.choice(GOOD_ANSWERS[attribute]).format(**slots(subject, rng))
            else:
                subject = answerer
                question = rng.choice(SELF_QUESTIONS[attribute]).format(**slots(subject))
                answer = rng.choice(SELF_ANSWERS[attribute]).format(**slots(subject, rng))
            asked.add((subject.name, attribute))
            self.mentions[subject.name, attribute] += 1
            if attribute == "pet" and subject.pet_name in answer:
                self.mentions[subject.name, "pet_name"] += 1
            said = answer[:-1] + "," if answer.endswith(".") else answer
            line = rng.choice(CONVERSATION_LINES)
            if asker.gender == "male":
                line = line.replace(" she asked", " he asked")
            lines.append(line.format(q=question, a=answer, a_said=said, x=asker.name, y=answerer.name))
        lines.append(rng.choice(["Then they said goodbye.", "After that, they went their separate ways.",
                                 f"\"See you soon,\" said {first.name}.", "They talked until it grew dark."]))
        return " ".join(lines)

    def scene(self) -> str:
        """A moment in a town: mostly scenery, with someone from the world passing through."""
        rng = self.rng
        person = self.next_person()
        town = rng.choice(self.world.places)
        sentences = [rng.choice([f"{rng.choice(TIME_OPENINGS)} in {town.name}, {rng.choice(WEATHER)}.",
                                 f"It was {rng.choice(['quiet', 'busy', 'peaceful', 'lively'])} in {town.name} that "
                                 f"{rng.choice(['morning', 'afternoon', 'evening'])}, and {rng.choice(WEATHER)}."])]
        sentences += [scenery(rng, person.name) for _ in range(rng.randint(3, 6))]
        if rng.random() < 0.5:
            sentences.append(self.fact(rng.choice(STATEMENTS), person))
        return " ".join(sentences)

    def arithmetic(self) -> str:
        """Sums and differences, mostly of numbers up to 10 (the ones prompts ask), some larger for variety."""
        rng = self.rng
        lines = []
        for _ in range(rng.randint(8, 14)):  # about 40 statements of each small sum in the cpu world
            op = rng.choice(["plus", "minus"])
            if rng.random() < 0.88:
                if op == "plus":
                    a, b, r = small_problem(rng, op)
                else:  # every small difference, and every small sum read backwards (12 minus 5 is 7)
                    b, r = rng.randint(*SMALL_OPERANDS), rng.randint(*SMALL_OPERANDS)
                    a = b + r
            else:
                a, b = rng.randint(10, 60), rng.randint(1, 39)
                if op == "minus" and b > a:
                    a, b = b, a
                r = a + b if op == "plus" else a - b
            lines.append(sum_sentence(op, a, b, r, rng, rng.choice(self.world.people)))
        intro = rng.choice(["", "Let us practise some sums. ", "Here are some little sums. ", "Numbers are fun. ",
                            f"{rng.choice(self.world.people).name} was doing sums at the kitchen table. "])
        return intro + " ".join(lines)

    def reading(self) -> str:
        """A made-up passage, then questions about it answered from the text (the first about its main person)."""
        rng = self.rng
        passage = write_passage(rng)
        self.passages.add(passage["text"])
        first = rng.choice(passage["main_askable"])
        rest = [pair for pair in passage["askable"] if pair != first]
        pairs = [first] + rng.sample(rest, min(len(rest), rng.choice([0, 1, 1, 2])))
        lines = []
        for person, attribute in pairs:
            question = rng.choice(FACT_QUESTIONS[attribute]).format(**slots(person))
            answer = rng.choice(GOOD_ANSWERS[attribute]).format(**slots(person))
            said = {"q_said": question[:-1] + "," if question.endswith(".") else question, "a_said": answer[:-1] + ","}
            lines.append(rng.choice(READING_ANSWERS).format(q=question, a=answer, **said))
        return rng.choice(READING_OPENINGS).format(passage=passage["text"]) + "\n".join(lines)

    def counting(self) -> str:
        rng = self.rng
        start = rng.randint(1, 15) if rng.random() < 0.7 else rng.randint(1, 40)  # mostly where prompts count
        end = start + rng.randint(3, 12)
        digits = ", ".join(str(i) for i in range(start, end + 1))
        spelled = ", ".join(number_to_words(i) for i in range(start, end + 1))
        forms = [f"Let us count from {start} to {end}: {digits}.", f"Counting from {number_to_words(start)} to {number_to_words(end)}: {spelled}.",
                 f"{spelled.capitalize()}.", f"The numbers from {start} to {end} are {digits}.",
                 f"After {start} comes {start + 1}, and after {start + 1} comes {start + 2}.",
                 f"{rng.choice(self.world.people).name} counted the {rng.choice(THINGS)}: {digits}. There were {end - start + 1} in all.",
                 f"Count with me: {digits}. Well done!"]
        picks = rng.sample(forms, rng.randint(2, 4))
        if rng.random() < 0.3:
            step = rng.choice([2, 5, 10])
            picks.append(f"Counting in {step}s: " + ", ".join(str(step * i) for i in range(1, rng.randint(5, 10))) + ".")
        return " ".join(picks)

    def place(self) -> str:
        rng = self.rng
        place = rng.choice(self.world.places)
        residents = [p for p in self.world.people if p.town == place.name]
        sentences = [rng.choice([f"{place.name} is a {rng.choice(['small', 'pleasant', 'old', 'busy', 'quiet', 'pretty'])} town {place.setting}.",
                                 f"The town of {place.name} lies {place.setting}.",
                                 f"You will find {place.name} {place.setting}."]),
                     rng.choice([f"It is known for its {place.landmark}.", f"People come from far away to see the {place.landmark} of {place.name}.",
                                 f"The pride of {place.name} is its {place.landmark}.", f"In the middle of the town there is a {place.landmark}."])]
        season = rng.choice(sorted(SEASONS))
        sentences.append(f"{place.name} is lovely in {season}, when {SEASONS[season]}.")
        if residents:
            chosen = rng.sample(residents, min(len(residents), rng.randint(1, 4)))
            names = [p.name for p in chosen]
            sentences.append(f"{join_names(names)} {'lives' if len(names) == 1 else 'live'} in {place.name}.")
            for person in chosen:
                self.mentions[person.name, "town"] += 1
            for person in chosen[:2]:
                sentences.append(self.fact(rng.choice(["job", "pet", "age"]), person))
        else:
            sentences.append(f"Not many people live in {place.name} these days, but travellers often stop there.")
        return " ".join(sentences)

    def animal(self) -> str:
        rng = self.rng
        kind = rng.choice(sorted(ANIMALS))
        animal = ANIMALS[kind]
        legs = "no legs" if animal.legs == 0 else f"{rng.choice([str(animal.legs), number_to_words(animal.legs)])} legs"
        where = HABITATS[animal.habitat]
        sentences = rng.sample([f"{article(kind).capitalize()} has {legs}.", f"{article(kind).capitalize()} says \"{animal.sound}\".",
                                f"The sound {article(kind)} makes is \"{animal.sound}\".", f"{animal.plural.capitalize()} live {where}.",
                                f"You will usually find {animal.plural} {where}.", f"{animal.plural.capitalize()} have {legs}."], 3)
        owners = [p for p in self.world.people if p.pet == kind]
        for person in rng.sample(owners, min(len(owners), 2)):
            sentences.append(self.fact("pet", person))
        if rng.random() < 0.5:
            other = rng.choice(sorted(ANIMALS))
            sentences.append(f"{article(other).capitalize()} lives {HABITATS[ANIMALS[other].habitat]} and says \"{ANIMALS[other].sound}\".")
        return " ".join(sentences)


# -- questions ----------------------------------------------------------------------------------------

@dataclass
class Question:
    """One user turn and everything needed to answer it well or badly, and to judge an answer."""

    kind: str
    prompt: str
    judge: dict  # the fields minigpt.judge.score reads; judge["reference"] is a good answer
    good: list[str]
    curt: str
    wrong: list[str]
    context: dict = field(default_factory=dict)  # what a follow-up question needs

    def answer(self, quality: str, rng: random.Random) -> str:
        """A demonstration of the given quality: good, verbose, curt or wrong."""
        if quality == "good":
            return rng.choice(self.good)
        if quality == "verbose":
            parts = [rng.choice(VERBOSE_OPENERS), rng.choice(self.good)]
            if rng.random() < 0.5:
                parts.append(rng.choice(VERBOSE_MIDDLES))
            return " ".join(parts + [rng.choice(VERBOSE_CLOSERS)])
        if quality == "curt":
            return self.curt
        if quality == "wrong":
            return rng.choice(self.wrong)
        raise ValueError(f"unknown answer quality {quality!r}; expected one of {', '.join(QUALITY_MIX)}")


def _value(person: Person, attribute: str) -> str:
    return str(getattr(person, attribute))


class QuestionMaker:
    """Makes questions of every kind; all randomness comes from its `rng`."""

    def __init__(self, world: World, rng: random.Random, pretraining_passages: set[str] | frozenset = frozenset()):
        self.world, self.rng = world, rng
        self.world_names = [p.name for p in world.people]
        self.pretraining_passages = pretraining_passages  # a prompt's passage is never one pretraining showed
        self.categories = {"town": list(TOWNS), "job": sorted(JOBS), "pet": sorted(ANIMALS),
                           "pet_name": sorted(set(PET_NAMES) | {p.pet_name for p in world.people}),
                           "colour": list(COLOURS), "food": list(FOODS)}

    def make(self, kind: str) -> Question:
        if kind == "passage":
            passage = self.passage()
            person, attribute = self.rng.choice(passage["main_askable"])
            return self.passage_question(passage, person, attribute)
        if kind == "arithmetic":
            return self.arithmetic()
        if kind == "instruction":
            return self.instruction(self.rng.choice(INSTRUCTION_TASKS))
        raise ValueError(f"QuestionMaker.make: no random question of kind {kind!r}; fact questions come from a fact plan")

    # facts about people: the world's (fact) or made up on the spot (passage) ---------------------------

    def about_person(self, kind: str, person: Person, attribute: str, question: str, candidates: dict,
                     distractors: dict | None = None) -> Question:
        """A question about `attribute` of `person`. `candidates` lists each category's values (all wrong but
        the answer); wrong demonstrations prefer `distractors`, the values a passage also mentions."""
        rng = self.rng
        value = _value(person, attribute)
        good = [t.format(**slots(person)) for t in GOOD_ANSWERS[attribute]]
        if attribute == "age":
            others = [a for a in range(max(1, person.age - 12), person.age + 13) if a != person.age]
            others = [a for a in (distractors or {}).get("age", []) if a != person.age] or others
            wrong_values = [str(a) for a in rng.sample(others, min(3, len(others)))]
            judge = {"check": "number", "numbers": []}
        else:
            pool = [c for c in (distractors or {}).get(attribute, []) if c != value]
            pool = pool or [c for c in candidates[attribute] if c != value]
            wrong_values = rng.sample(pool, min(3, len(pool)))
            judge = {"check": "mention", "candidates": [c for c in candidates[attribute] if c != value]}
        field_value = int if attribute == "age" else str
        wrong = [rng.choice(GOOD_ANSWERS[attribute]).format(**slots(dataclasses.replace(person, **{attribute: field_value(w)})))
                 for w in wrong_values]
        judge = {"kind": kind, "attribute": attribute, "person": person.name, "answer": value, **judge,
                 "subject": [person.name], "reference": good[0]}
        return Question(kind, question, judge, good, value.lower(), wrong, {"person": person, "attribute": attribute})

    def fact(self, person: Person, attribute: str, template: str) -> Question:
        return self.about_person("fact", person, attribute, template.format(**slots(person)), self.categories)

    def fact_follow_up(self, previous: Question, attribute: str) -> Question:
        """A second-turn question about the same person, by pronoun."""
        person = previous.context["person"]
        question = self.rng.choice(FOLLOW_UP_QUESTIONS[attribute]).format(**slots(person))
        return self.about_person("fact", person, attribute, question, self.categories)

    def passage(self) -> dict:
        """A short text about made-up people (see write_passage): the answer must be read, not remembered."""
        passage = write_passage(self.rng)
        while passage["text"] in self.pretraining_passages:
            passage = write_passage(self.rng)
        passage["candidates"] = {**self.categories, "town": [p.town for p in passage["people"]] + list(TOWNS),
                                 "pet_name": sorted(set(PASSAGE_PET_NAMES) | set(PET_NAMES))}
        passage["distractors"] = {a: [int(v) if a == "age" else v for v in values]
                                  for a, values in passage["stated"].items()}
        return passage

    def passage_question(self, passage: dict, person: Person, attribute: str, follow_up: bool = False) -> Question:
        question = self.rng.choice(FACT_QUESTIONS[attribute]).format(**slots(person))
        if follow_up:
            prompt = "And " + question[0].lower() + question[1:]
        else:
            prompt = self.rng.choice(PASSAGE_PROMPTS).format(passage=passage["text"], question=question)
        q = self.about_person("passage", person, attribute, prompt, passage["candidates"], passage["distractors"])
        q.context["passage"] = passage
        return q

    def passage_follow_up(self, previous: Question) -> Question:
        passage = previous.context["passage"]
        asked = (previous.context["person"], previous.context["attribute"])
        person, attribute = self.rng.choice([pair for pair in passage["askable"] if pair != asked] or [asked])
        return self.passage_question(passage, person, attribute, follow_up=True)

    # arithmetic ---------------------------------------------------------------------------------------

    def arithmetic(self) -> Question:
        rng = self.rng
        op = rng.choice(["plus", "minus"])
        story = rng.random() < 0.3  # a little story problem
        a, b, r = small_problem(rng, op, lowest=2 if story else SMALL_OPERANDS[0])  # 2: plural things
        subject = [str(a), str(b)]
        if story:
            question, answer = rng.choice(STORY_SUMS if op == "plus" else STORY_DIFFERENCES)
            person = rng.choice(self.world.people)
            values = {**slots(person), "things": rng.choice(THINGS)}
            prompt = question.format(a=a, b=b, **values)
            good = [answer.format(r=r, **values)]
            wrong = [answer.format(r=w, **values) for w in self._wrong_numbers(r, a, b)]
            subject = [values["things"]]
        else:
            words_share = 0.25
            prompt = rng.choice(PLUS_QUESTIONS if op == "plus" else MINUS_QUESTIONS).format(
                a=spell(a, rng, words_share), b=spell(b, rng, words_share))
            templates = PLUS_ANSWERS if op == "plus" else MINUS_ANSWERS
            good = [t.format(a=a, b=b, r=r) for t in templates]
            wrong = [rng.choice(templates).format(a=a, b=b, r=w) for w in self._wrong_numbers(r, a, b)]
        judge = {"kind": "arithmetic", "op": op, "check": "number", "answer": str(r), "numbers": [a, b],
                 "subject": subject, "reference": good[0]}
        return Question("arithmetic", prompt, judge, good, str(r), wrong, {"result": r})

    def arithmetic_follow_up(self, previous: Question) -> Question:
        rng = self.rng
        a = previous.context["result"]  # 0..20; the follow-up keeps the result in 0..20 too
        op = rng.choice([op for op, possible in (("plus", a < 20), ("minus", a > 0)) if possible])
        largest = min(SMALL_OPERANDS[1], 20 - a if op == "plus" else a)
        b = rng.randint(1, largest)
        r = a + b if op == "plus" else a - b
        templates = PLUS_ANSWERS if op == "plus" else MINUS_ANSWERS
        good = [t.format(a=a, b=b, r=r) for t in templates]
        wrong = [rng.choice(templates).format(a=a, b=b, r=w) for w in self._wrong_numbers(r, a, b)]
        judge = {"kind": "arithmetic", "op": op, "check": "number", "answer": str(r), "numbers": [a, b],
                 "subject": [str(a), str(b)], "reference": good[0]}
        prompt = rng.choice(ARITHMETIC_FOLLOW_UPS[op]).format(c=b)
        return Question("arithmetic", prompt, judge, good, str(r), wrong, {"result": r})

    def _wrong_numbers(self, right: int, *operands: int) -> list[int]:
        """Plausible mistakes: close to the right answer, never it, never an operand."""
        near = [right + d for d in (-3, -2, -1, 1, 2, 3, 10, -10) if right + d >= 0 and right + d not in operands]
        return self.rng.sample(near, min(3, len(near)))

    # instructions -------------------------------------------------------------------------------------

    def instruction(self, task: str) -> Question:
        rng = self.rng
        if task == "count":
            a = rng.randint(1, 14)
            b = a + rng.randint(2, 5)  # three to six numbers
            prompt = rng.choice(COUNT_INSTRUCTIONS).format(a=spell(a, rng, 0.2), b=spell(b, rng, 0.2))
            numbers = list(range(a, b + 1))
            good = [t.format(a=a, b=b, sequence=", ".join(map(str, numbers))) for t in COUNT_ANSWERS]
            mistakes = [numbers[:len(numbers) // 2] + numbers[len(numbers) // 2 + 1:], numbers + [b + 1],
                        [a - 1] + numbers if a > 1 else numbers[1:], numbers[:-1]]
            wrong = [rng.choice(COUNT_ANSWERS).format(a=a, b=b, sequence=", ".join(map(str, m))) for m in mistakes]
            judge = {"check": "count", "start": a, "end": b, "answer": ", ".join(map(str, numbers)), "subject": []}
            curt = " ".join(map(str, numbers))
        elif task == "greet":
            name = rng.choice(self.world_names if rng.random() < 0.5 else PASSAGE_FEMALE_NAMES + PASSAGE_MALE_NAMES)
            prompt = rng.choice(GREET_INSTRUCTIONS).format(n=name)
            good = [t.format(n=name) for t in GREET_ANSWERS]
            others = [n for n in self.world_names if n != name]
            wrong = [rng.choice(GREET_ANSWERS).format(n=other) for other in rng.sample(others, min(3, len(others)))]
            judge = {"check": "greet", "answer": name, "candidates": others, "subject": [name]}
            curt = f"hello {name.lower()}"
        elif task == "name_animal":
            habitat = rng.choice(sorted(HABITATS))
            where = HABITATS[habitat]
            prompt = rng.choice(ANIMAL_INSTRUCTIONS).format(where=where)
            fitting = [k for k, a in sorted(ANIMALS.items()) if a.habitat == habitat]
            others = [k for k in sorted(ANIMALS) if k not in fitting]
            animal = rng.choice(fitting)
            good = [t.format(A_animal=article(animal).capitalize(), animal=animal, where=where) for t in ANIMAL_ANSWERS]
            wrong = [rng.choice(ANIMAL_ANSWERS).format(A_animal=article(o).capitalize(), animal=o, where=where)
                     for o in rng.sample(others, 3)]
            judge = {"check": "mention", "answer": animal, "accepted": fitting, "candidates": others,
                     "habitat": habitat, "subject": [habitat]}
            curt = animal
        elif task == "repeat":
            word, times = rng.choice(REPEAT_WORDS), rng.randint(2, 4)
            prompt = rng.choice(REPEAT_INSTRUCTIONS).format(w=word, k=spell(times, rng, 0.6))
            said = lambda k: ", ".join([word] * k)  # noqa: E731
            good = [said(times).capitalize() + ".", f"Here it is: {said(times)}."]
            wrong = [said(k).capitalize() + "." for k in (times - 1, times + 1, times + 2)]
            judge = {"check": "repeat", "word": word, "times": times, "answer": said(times), "subject": [word]}
            curt = " ".join([word] * times)
        else:
            raise ValueError(f"unknown instruction task {task!r}; expected one of {', '.join(INSTRUCTION_TASKS)}")
        judge = {"kind": "instruction", "task": task, **judge, "reference": good[0]}
        return Question("instruction", prompt, judge, good, curt, wrong, {"task": task})

    def instruction_follow_up(self, previous: Question) -> Question:
        question = self.instruction(self.rng.choice(INSTRUCTION_TASKS))
        question.prompt = self.rng.choice(FOLLOW_UP_OPENERS) + question.prompt
        return question

    def follow_up(self, previous: Question, attributes: list[str] | None = None) -> Question:
        if previous.kind == "fact":
            asked = previous.context["attribute"]
            return self.fact_follow_up(previous, self.rng.choice([a for a in attributes if a != asked] or [asked]))
        if previous.kind == "passage":
            return self.passage_follow_up(previous)
        if previous.kind == "arithmetic":
            return self.arithmetic_follow_up(previous)
        return self.instruction_follow_up(previous)


# -- splitting the facts, building the sets ---------------------------------------------------------------

def split_facts(world: World, n_fact_prompts: dict[str, int], rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """(person, attribute) pairs -> "sft" (about half) and the held-out prompt sets (the rest)."""
    sft, held_out = [], []
    for i, person in enumerate(world.people):
        attributes = rng.sample(ATTRIBUTES, len(ATTRIBUTES))
        n_sft = round(len(ATTRIBUTES) * SFT_FACT_SHARE) if i % 2 else int(len(ATTRIBUTES) * SFT_FACT_SHARE)
        sft += [(person.name, a) for a in attributes[:n_sft]]
        held_out += [(person.name, a) for a in attributes[n_sft:]]
    rng.shuffle(held_out)
    # eval gets its own facts, one question each where it can; ranking and PPO share the rest by need
    n_eval = max(1, min(n_fact_prompts["eval"], len(held_out) // 3))
    split = {"sft": sft, "eval": held_out[:n_eval]}
    rest = held_out[n_eval:]
    need = n_fact_prompts["ranking"] + n_fact_prompts["ppo"]
    n_ranking = round(len(rest) * n_fact_prompts["ranking"] / need) if need else len(rest) // 2
    split["ranking"], split["ppo"] = rest[:n_ranking], rest[n_ranking:]
    return split


def fact_plan(pairs: list[tuple[str, str]], rng: random.Random):
    """(person, attribute, question template) in rounds over the pairs: each pair asked about as evenly
    as possible, never with the same phrasing twice."""
    phrasings = {pair: rng.sample(FACT_QUESTIONS[pair[1]], len(FACT_QUESTIONS[pair[1]])) for pair in pairs}
    for round_index in range(max((len(v) for v in phrasings.values()), default=0)):
        for pair in pairs:
            if round_index < len(phrasings[pair]):
                yield pair[0], pair[1], phrasings[pair][round_index]


class PromptRegistry:
    """Which set claimed each prompt text: no text may appear in two sets."""

    def __init__(self):
        self.owner: dict[str, str] = {}

    def free(self, text: str, set_name: str, unique: bool) -> bool:
        owner = self.owner.get(text)
        return owner is None or (owner == set_name and not unique)

    def claim(self, text: str, set_name: str):
        self.owner.setdefault(text, set_name)


MAX_TRIES = 2000


def fresh_question(set_name: str, kind: str, maker: QuestionMaker, registry: PromptRegistry, unique: bool,
                   facts=None, world: World | None = None) -> Question:
    """A question whose prompt no other set has (nor this set, if `unique`)."""
    for _ in range(MAX_TRIES):
        if kind == "fact":
            name, attribute, template = next(facts, (None, None, None))
            if name is None:
                raise ValueError(f"{set_name}: ran out of fact questions (every held-out fact asked in every "
                                 f"phrasing); raise DataConfig.n_people or lower the number of {set_name} prompts")
            question = maker.fact(world.person(name), attribute, template)
        else:
            question = maker.make(kind)
        if registry.free(question.prompt, set_name, unique):
            registry.claim(question.prompt, set_name)
            return question
    raise ValueError(f"{set_name}: found no fresh {kind} prompt in {MAX_TRIES} tries: the world is too small for "
                     f"this many prompts; lower the set's size in DataConfig")


def build_prompt_set(set_name: str, n: int, maker: QuestionMaker, registry: PromptRegistry, facts, world: World,
                     rng: random.Random) -> list[dict]:
    records = []
    for i, kind in enumerate(allocate(n, KIND_MIX, rng)):
        question = fresh_question(set_name, kind, maker, registry, unique=True, facts=facts, world=world)
        records.append({"id": f"{set_name}-{i:04d}", "messages": [{"role": "user", "content": question.prompt}],
                        **question.judge})
    return records


def build_dialogues(set_name: str, n: int, maker: QuestionMaker, registry: PromptRegistry, sft_facts: list,
                    world: World, rng: random.Random, unique: bool) -> list[dict]:
    """SFT dialogues: mixed-quality demonstrations, a fifth of them with a follow-up turn."""
    sft_attributes: dict[str, list[str]] = {}
    for name, attribute in sft_facts:
        sft_attributes.setdefault(name, []).append(attribute)
    kinds, qualities = allocate(n, KIND_MIX, rng), allocate(n, QUALITY_MIX, rng)
    two_turn = allocate(n, {True: TWO_TURN_FRACTION, False: 1 - TWO_TURN_FRACTION}, rng)
    dialogues = []
    for i, (kind, quality, follow) in enumerate(zip(kinds, qualities, two_turn)):
        facts = None
        if kind == "fact":  # any SFT fact in any phrasing: repeats across dialogues are fine here
            pairs = rng.sample(sft_facts, min(8, len(sft_facts)))
            facts = iter([(name, attribute, rng.choice(FACT_QUESTIONS[attribute])) for name, attribute in pairs])
        question = fresh_question(set_name, kind, maker, registry, unique, facts=facts, world=world)
        turns = [question]
        if follow:
            name = question.context.get("person").name if kind == "fact" else None
            turns.append(maker.follow_up(question, sft_attributes.get(name)))
        messages = []
        for turn_index, turn in enumerate(turns):
            last = turn_index == len(turns) - 1
            # a demonstrator keeps one style through a dialogue; a wrong one errs on the last turn
            turn_quality = quality if last or quality != "wrong" else "good"
            messages += [{"role": "user", "content": turn.prompt},
                         {"role": "assistant", "content": turn.answer(turn_quality, rng)}]
        facts_asked = [[t.context["person"].name, t.context["attribute"]] for t in turns if t.kind == "fact"]
        dialogues.append({"id": f"{set_name}-{i:05d}", "messages": messages, "kind": kind, "quality": quality,
                          "judge": turns[-1].judge, "facts_asked": facts_asked})
    return dialogues


# -- writing ------------------------------------------------------------------------------------------

def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _text_stats(texts: list[str]) -> dict:
    return {"documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "words": sum(len(t.split()) for t in texts)}


def _dialogue_stats(dialogues: list[dict]) -> dict:
    return {"dialogues": len(dialogues), "turns": sum(len(d["messages"]) // 2 for d in dialogues),
            "two_turn": sum(len(d["messages"]) > 2 for d in dialogues),
            "kinds": dict(sorted(Counter(d["kind"] for d in dialogues).items())),
            "qualities": dict(sorted(Counter(d["quality"] for d in dialogues).items()))}


def judge_by_quality(dialogues: list[dict]) -> dict:
    """The gold judge's mean score of the demonstrations' last answers, per quality label."""
    totals: dict[str, list[float]] = {}
    for d in dialogues:
        totals.setdefault(d["quality"], []).append(score(d["judge"], d["messages"][-1]["content"])["score"])
    return {quality: round(sum(v) / len(v), 4) for quality, v in sorted(totals.items())}


def generate_world(out_dir: str | Path, config: DataConfig, seed: int) -> dict:
    """Write the whole default dataset for `config` and `seed` into `out_dir`; return its stats."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    world = build_world(config.n_people, rng)

    # pretraining text: every fact stated many times, in many phrasings
    writer = DocumentWriter(world, rng)
    document_kinds = allocate(config.n_documents, DOCUMENT_MIX, rng)
    documents = [writer.write(kind) for kind in document_kinds]
    n_val = max(1, round(config.n_documents * config.val_fraction))
    pretrain = {"train": documents[:-n_val], "val": documents[-n_val:]}

    # prompt sets first (eval before all), then SFT: a later set skips prompts an earlier one claimed
    sizes = {"eval": config.n_eval_prompts, "ppo": config.n_ppo_prompts, "ranking": config.n_ranking_prompts}
    n_fact_prompts = {name: allocation(n, KIND_MIX)["fact"] for name, n in sizes.items()}
    facts = split_facts(world, n_fact_prompts, rng)
    maker, registry = QuestionMaker(world, rng, writer.passages), PromptRegistry()
    prompts = {name: build_prompt_set(name, sizes[name], maker, registry, fact_plan(facts[name], rng), world, rng)
               for name in PROMPT_SETS}
    sft = {"val": build_dialogues("sft-val", config.n_sft_val, maker, registry, facts["sft"], world, rng, unique=True),
           "train": build_dialogues("sft-train", config.n_sft_dialogues, maker, registry, facts["sft"], world, rng,
                                    unique=False)}

    files = {f"pretrain_{split}.jsonl": _jsonl([{"text": t} for t in texts]) for split, texts in pretrain.items()}
    files.update({f"sft_{split}.jsonl": _jsonl(dialogues) for split, dialogues in sft.items()})
    files.update({f"prompts_{name}.jsonl": _jsonl(records) for name, records in prompts.items()})
    mentions = [writer.mentions[p.name, a] for p in world.people for a in ATTRIBUTES]
    world_record = {"seed": seed,
                    "people": [dataclasses.asdict(p) for p in world.people],
                    "places": [dataclasses.asdict(p) for p in world.places],
                    "animals": [{"name": k, **dataclasses.asdict(a)} for k, a in ANIMALS.items()],
                    "habitats": HABITATS,
                    "fact_split": {name: [list(pair) for pair in pairs] for name, pairs in facts.items()}}
    stats = {"seed": seed, "config": dataclasses.asdict(config),
             "pretrain": {split: _text_stats(texts) for split, texts in pretrain.items()},
             "document_kinds": dict(sorted(Counter(document_kinds).items())),
             "fact_mentions": {"min": min(mentions), "mean": round(sum(mentions) / len(mentions), 2)},
             "facts": {name: len(pairs) for name, pairs in facts.items()},
             "sft": {split: _dialogue_stats(dialogues) for split, dialogues in sft.items()},
             "prompts": {name: {"prompts": len(records), "kinds": dict(sorted(Counter(r["kind"] for r in records).items()))}
                         for name, records in prompts.items()},
             "judge_by_quality": judge_by_quality(sft["train"])}
    files["world.json"] = json.dumps(world_record, indent=1, ensure_ascii=False) + "\n"
    files["stats.json"] = json.dumps(stats, indent=1, ensure_ascii=False) + "\n"
    for name, text in files.items():
        write_text_atomic(out / name, text)  # a reader never sees half a file
    log.info("world: wrote %d files to %s (%d pretraining documents, %d SFT dialogues)", len(files), out,
             config.n_documents, config.n_sft_dialogues)
    return stats


__all__ = ["generate_world", "build_world", "World", "Person", "Place", "Question", "QuestionMaker",
           "DocumentWriter", "split_facts", "allocate", "ATTRIBUTES", "KIND_MIX", "QUALITY_MIX"]
