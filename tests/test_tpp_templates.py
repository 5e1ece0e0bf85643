"""Templates: the paper's appendix word for word, selection by name or file, refusal of unusable ones."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tpp import DEFAULT_TEMPLATE_NAMES, TEMPLATES, load_templates
from tpp.templates import check_template

# The appendix, copied from the paper, with its a/b/c placeholders as bare letters.
APPENDIX = [
    "a implies b and if b then c therefore by the transitive property a also implies",
    "if all a are b and b are c then all a are",
    "if all a are b and b is a type of c then it can be inferred that all a are a type of",
    "a implies b and if b then c therefore a also implies",
    "a implies b and if b then c therefore by the transitive property a also implies",
    "a implies b and b implies c then by the transitive property a also implies",
    "a is a type of b and all b are c therefore a is also a type of",
]
SECTION_5_1 = "if all a are b and all b are c it can be inferred that all a are"

words = st.text(alphabet="xyzqw", min_size=1, max_size=6)


def test_defaults_are_the_appendix_in_order_with_its_duplicate():
    texts = [TEMPLATES[n].format(a="a", b="b", c="c") for n in DEFAULT_TEMPLATE_NAMES]
    assert texts == APPENDIX
    assert load_templates() == {n: TEMPLATES[n] for n in DEFAULT_TEMPLATE_NAMES}


def test_section_5_1_template_is_known_but_off_by_default():
    extra = [n for n in TEMPLATES if n not in DEFAULT_TEMPLATE_NAMES]
    assert [TEMPLATES[n].format(a="a", b="b", c="c") for n in extra] == [SECTION_5_1]
    assert set(load_templates("all")) == set(TEMPLATES)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(TEMPLATES)), abc=st.lists(words, min_size=3, max_size=3, unique=True))
def test_prompt_words_sit_where_the_template_puts_them(name, abc):
    a, b, c = abc
    prompt = TEMPLATES[name].format(a=a, b=b, c=c)
    slots = TEMPLATES[name].split()
    filled = prompt.split()
    assert len(slots) == len(filled)
    for slot, word in zip(slots, filled):
        assert word == {"{a}": a, "{b}": b, "{c}": c}.get(slot, slot)
    assert slots[-1] != "{c}"


def test_select_by_names_and_comma_string():
    assert list(load_templates(["all-are", "type-of"])) == ["all-are", "type-of"]
    assert list(load_templates("all-are, implies")) == ["all-are", "implies"]


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"'all-ar'.*Did you mean 'all-are'"):
        load_templates("all-ar")


def test_template_file_keeps_repeats_and_skips_comments(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my templates\n{a} is {b} and {b} is {c} so {a} is\n\n{a} is {b} and {b} is {c} so {a} is\n")
    templates = load_templates(path)
    assert list(templates) == ["mine.txt:2", "mine.txt:4"]
    assert set(templates.values()) == {"{a} is {b} and {b} is {c} so {a} is"}


@pytest.mark.parametrize("text, complaint", [
    ("{a} implies {b} therefore {a} implies", r"lacks \{c\}"),
    ("{a} implies {b} and {b} implies {c} so {a} implies {c}", r"ends with \{c\}"),
    ("{a} implies {b} and {b} implies {c} so {d} implies", r"\{d\}"),
    ("{a} implies {b} and {b} implies {c} so {a} implies ", "whitespace"),
    ("{a} implies {b} and {b} implies {c} so {a!r} implies", "conversion"),
])
def test_unusable_templates_are_refused_by_name(text, complaint, tmp_path):
    with pytest.raises(ValueError, match=complaint) as err:
        check_template("bad-one", text)
    assert "bad-one" in str(err.value)
    path = tmp_path / "bad.txt"
    path.write_text(text.strip() + "\n")
    if complaint != "whitespace":  # a file's lines are stripped, so that one is fine there
        with pytest.raises(ValueError, match="bad.txt:1"):
            load_templates(path)


def test_missing_template_file_is_named():
    with pytest.raises(ValueError, match="does not exist"):
        load_templates("no/such/templates.txt")
