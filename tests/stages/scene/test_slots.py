from dataclasses import dataclass, field

import pytest

from refforge.stages.scene.slots import slot_constructor


@dataclass(frozen=True, slots=True)
class Pair:
    left: str
    right: tuple[int, ...]
    note: str | None = None


def test_builds_what_the_constructor_builds():
    build = slot_constructor(Pair)
    assert build is not Pair
    got = build("a", (1, 2), "n")
    assert got == Pair("a", (1, 2), "n") and hash(got) == hash(Pair("a", (1, 2), "n"))
    assert repr(got) == repr(Pair("a", (1, 2), "n")) and type(got) is Pair
    assert build("a", (1,)) == Pair("a", (1,))  # the default
    with pytest.raises(AttributeError):
        got.left = "b"  # still frozen
    with pytest.raises(TypeError):
        build("a")


@dataclass(frozen=True)
class NoSlots:
    x: int


@dataclass(frozen=True, slots=True)
class PostInit:
    x: int

    def __post_init__(self):
        if self.x < 0:
            raise ValueError("negative")


@dataclass(frozen=True, slots=True)
class Factory:
    xs: list = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Clash:
    obj: int


@pytest.mark.parametrize("cls", [NoSlots, PostInit, Factory, Clash, int])
def test_anything_else_is_built_by_its_own_constructor(cls):
    assert slot_constructor(cls) is cls
