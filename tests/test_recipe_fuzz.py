"""Hypothesis fuzz of the recipe loader: any input gives a Recipe or a RecipeError, nothing else."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_compress.recipes import SECTIONS, RecipeError, load_recipe, recipe_schema

KEYS = sorted({name for fields in recipe_schema().values() for name in fields})
SECTION_NAMES = [*SECTIONS, "vars", "prunning", "Qat", ""]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["int4", "int8", "2:4", "cubic", "self", "???", "${vars.x}", "${oops", "torch.nn.Linear", "bfloat16"]),
    st.text(max_size=12),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
SECTION_BODIES = st.one_of(
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=10), VALUES, max_size=4),
    SCALARS,
)
RECIPES = st.dictionaries(st.sampled_from(SECTION_NAMES), SECTION_BODIES, max_size=4)
OVERRIDES = st.lists(
    st.builds(
        lambda section, key, value: f"{section}.{key}={value}",
        st.sampled_from(SECTION_NAMES),
        st.sampled_from(KEYS) | st.text(string.ascii_letters, max_size=6),
        st.text(max_size=8),
    )
    | st.text(max_size=20),
    max_size=3,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _load(*args):
    try:
        recipe = load_recipe(*args)
    except RecipeError as err:
        message = str(err)
        assert message and "Traceback" not in message
        return None
    assert set(recipe.config) <= set(SECTIONS)
    return recipe


@FUZZ
@given(recipe=RECIPES, overrides=OVERRIDES)
def test_any_mapping_and_overrides_load_or_raise_recipe_error(recipe, overrides):
    _load(recipe, overrides)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_any_file_content_loads_or_raises_recipe_error(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _load(path)


@FUZZ
@given(
    lines=st.lists(
        st.builds(
            lambda section, key, value: f"{section}:\n  {key}: {value}\n",
            st.sampled_from(SECTION_NAMES),
            st.sampled_from(KEYS),
            st.sampled_from(["0.5", "1.5", "-1", "int4", "[a, b]", "{x: 1}", "null", "???", "${vars.a}", "yes", "'2:4'", "1e400"]),
        ),
        max_size=3,
    )
)
def test_yaml_built_from_real_keys_loads_or_raises_recipe_error(tmp_path, lines):
    path = tmp_path / "fuzz.yaml"
    path.write_text("".join(lines))
    _load(path)
