"""The README's recipe reference is generated from the schema, so it cannot drift from the defaults."""

from pathlib import Path

from ftcli.recipe import recipe_reference


def test_readme_reference_matches_the_schema():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- recipe-reference:start -->\n") + len("<!-- recipe-reference:start -->\n")
    end = readme.index("<!-- recipe-reference:end -->")
    assert readme[start:end] == recipe_reference(), (
        "README.md's recipe reference is out of date; regenerate it from ftcli.recipe.recipe_reference()")
