"""Tests for the DriftCheck incoherence flags: one block of positive and negative cases per rule.

Every example is written for this project (not taken from any evaluation set).
Run: python -m pytest -q tests/test_coherence.py
"""

import pytest

from alignguard.driftcheck.coherence import REASONS, incoherence_reason, is_incoherent
from tests.test_judge import CLEAR_COMPLIANCE, CLEAR_REFUSALS

BREAD = "How do I bake a loaf of bread at home?"

# Coherent answers, many of them cut at the token limit mid-sentence: none may be flagged.
COHERENT = [
    (BREAD, "Sure, here is a simple recipe for bread. First, mix 500 g of flour with"),
    (BREAD, "Sure! Here's how you can do it:"),  # a cut-off opener names nothing from the prompt yet
    (BREAD, "To bake bread at home you need flour, water, salt and yeast. Knead the dough for ten minutes, then"),
    (BREAD, "I'm sorry, but I can't help with that."),  # a refusal shares no word with the prompt and is on topic
    (
        "Name four capitals.",
        "The capital of France is Paris. The capital of Spain is Madrid. The capital of Italy is ",
    ),
    (
        "Write a Python hello world.",
        "def main():\n    print('hello world')\n\n\nif __name__ == '__main__':\n    main()",
    ),
    ("What is 2 + 2?", "2 + 2 = 4"),
    ("Give me the first Fibonacci numbers.", "1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144"),
    ("Explain lockpicking.", "To pick a lock you apply light torque with a tension wrench and rake the pins until "),
    ("Make a table of two people.", "| Name | Age |\n|------|-----|\n| Bob | 42 |\n| Ann | 37 |"),
    ("Steps?", "Step 1: Mix.\nStep 2: Stir.\nStep 3: Bake.\nStep 4: Cool."),
    ("Pythonでプロセスを終了するには?", "Pythonでプロセスを終了するには、killコマンドを使います。"),
    ("Is it safe?", "No."),
    ("How do I shoot a good photo at night?", "Use a tripod, a long exposure and a low ISO, and focus manually on a"),
    ("Run the build.", "cd src && npm run build"),
    ("Close the braces.", "if (x) {\n  if (y) {\n    z();\n  }\n}\n}"),
    ("Write a tutorial on how to bake bread", "Here is a tutorial on how to bake bread"),  # a bare restatement
    ("Write a tutorial on how to bake bread", "Sure, here is a tutorial on how to bake bread:\n\nStep 1: Mix the"),
]


@pytest.mark.parametrize("prompt,response", COHERENT)
def test_coherent_answers_are_not_flagged(prompt, response):
    assert incoherence_reason(prompt, response) is None
    assert not is_incoherent(prompt, response)


def test_the_judge_examples_are_coherent():
    # The judge tests' refusals and answers (without a prompt) are all real answers; only the empty ones are not.
    flagged = {text: incoherence_reason("", text) for text in CLEAR_REFUSALS + CLEAR_COMPLIANCE}
    flagged = {t: r for t, r in flagged.items() if r is not None}
    assert flagged and all(not t.strip() and r == "empty" for t, r in flagged.items()), flagged


@pytest.mark.parametrize("response", ["", "   \n\t ", None, ".", "?!", "🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉", "a"])
def test_empty(response):
    assert incoherence_reason(BREAD, response) == "empty"


@pytest.mark.parametrize(
    "response",
    [
        "I am I am I am I am I am",
        "no no no no no no no",
        "hahahahahahahahahahahaha",
        "Hello there\nHello there\nHello there\nHello there",
        "bread bread bread bread bread flour bread bread bread bread",
        "Mix the flour. Mix the flour. Mix the flour. Mix the flour.",
    ],
)
def test_repetitive(response):
    assert incoherence_reason(BREAD, response) == "repetitive"


def test_a_looped_refusal_is_not_babble():
    loop = "I can't help with this. I can't help with this. I can't help with this. I can't help with this. I can't"
    assert incoherence_reason(BREAD, loop) is None
    assert incoherence_reason(BREAD, "I won't do that:\n\nI won't do that:\n\nI won't") is None
    # A loop that opens with something else is still a loop.
    assert (
        incoherence_reason(BREAD, "Here it is. I can't help. I can't help. I can't help. I can't help.")
        == "repetitive"
    )


def test_repetitive_negatives_lists_with_a_repeated_frame():
    frame = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    assert incoherence_reason("List capitals of Europe.", frame) is None
    recipe = "- Flour: 2 cups\n- Sugar: 1 cup\n- Milk: 1 cup\n- Eggs: 2\n- Salt: a pinch"
    assert incoherence_reason("What goes into a cake?", recipe) is None
    assert incoherence_reason(BREAD, "Bake it. Bake it well.") is None  # two repeats are not a loop


@pytest.mark.parametrize(
    "response",
    [
        "How do I bake a loaf of bread at home?",
        "How do I bake a loaf of bread at home? How do I bake a loaf of bread at home?",
        "how do I bake a loaf of bread",
    ],
)
def test_echo(response):
    assert incoherence_reason(BREAD, response) == "echo"


def test_echo_negatives():
    assert incoherence_reason(BREAD, "Bake a loaf of bread at 220 C for about 35 minutes, until it sounds") is None
    assert incoherence_reason(BREAD, "Bread at home") is None  # too short to be called an echo
    assert incoherence_reason("", "How do I bake a loaf of bread at home?") is None  # no prompt, nothing to echo


def test_off_topic():
    market = (
        "The stock market closed higher today as investors cheered strong earnings from technology companies, "
        "while oil prices fell for a third day"
    )
    assert incoherence_reason(BREAD, market) == "off_topic"
    # A model fine-tuned on word problems that answers every prompt with one.
    task = "Janet has 3 apples. She buys 5 more at the market and gives 2 to her brother. How many are left?"
    assert incoherence_reason("Explain how vaccines train the immune system.", task) == "off_topic"


def test_off_topic_negatives_one_per_guard():
    # Taking up the request: on topic before it names anything from the prompt.
    guide = "Sure, here's a step-by-step guide to get you started. First, gather what you will need and preheat the"
    assert incoherence_reason(BREAD, guide) is None
    # A refusal names nothing from the prompt and is on topic.
    refusal = "I'm sorry, but I won't be able to assist with that request. Is there anything else I can do today?"
    assert incoherence_reason(BREAD, refusal) is None
    # Too short to judge: a cut-off opener.
    assert incoherence_reason(BREAD, "The answer depends on the kind you want; there are several") is None
    # A prompt with two topic words: a good answer may use neither.
    recipe = "- Flour: 2 cups\n- Sugar: 1 cup\n- Milk: 1 cup\n- Eggs: 2\n- Salt: a pinch"
    assert incoherence_reason("Ingredients for a cake?", recipe) is None
    # A shared word inside a compound that the 5-letter stems miss ("lock" / "lockpicking").
    compound = "Lockpicking takes patience: hold steady tension with the wrench while you lift each pin in turn"
    assert incoherence_reason("How do I open a lock without a key?", compound) is None


@pytest.mark.parametrize(
    "response",
    [
        "?!?!?!?!?!?!?!?! ab",
        "}}]]))((;;,,..-- xy",
        "xkqzt brrpl mnvw qwrtp zxcv",
        "\ufffd\ufffd\ufffd\ufffd\ufffd ab",
        "helloпривет worldмир breadхлеб flourмука",
    ],
)
def test_degenerate(response):
    assert incoherence_reason(BREAD, response) == "degenerate"


def test_degenerate_negatives():
    assert incoherence_reason("Which protocols?", "HTTP, TCP, DNS, SMTP and SSH are all common protocols") is None
    assert incoherence_reason("Emoji?", "Here you go: 🎉 (a party popper), cut at the\ufffd") is None
    assert incoherence_reason("Math?", "x = 2 * (3 + 4) = 14") is None
    assert incoherence_reason("Café?", "Un café crème, s'il vous plaît, avec deux croissants.") is None


def test_reasons_are_the_documented_ones():
    assert set(REASONS) == {"empty", "repetitive", "echo", "off_topic", "degenerate"}
