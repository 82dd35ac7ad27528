"""The default model's training recipe as a validated config: one pydantic model, loaded from YAML.

Unknown keys and bad values are refused with a one-line `RecipeError` naming the first problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from workbench.data.probe_scenes import QUESTION_TYPES
from workbench.errors import WorkbenchError
from workbench.training.lora import LoraSettings
from workbench.training.optimisation import AdamWSchedule, Optimisation
from workbench.training.precision import Precision, ResolvedPrecision

DEFAULT_RECIPE = Path(__file__).with_name("recipe.yaml")
StageName = Literal["stage1", "stage2"]
QuestionType = Literal[QUESTION_TYPES]


class RecipeError(WorkbenchError):
    """A recipe or run folder that cannot be used as it is."""



class StageConfig(AdamWSchedule):
    """One stage of the default recipe: its optimisation and how many conversations make a step."""

    conversations_per_step: int = Field(gt=0)
    micro_batch_size: int = Field(gt=0)


class FocusPhase(BaseModel):
    """One phase of a curriculum: `steps` steps that ask only `question_types` about scenes of at most
    `max_objects` objects. Stage 2 runs its focus phases in order, then the full mix."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(gt=0)
    question_types: list[QuestionType] = Field(min_length=1)
    max_objects: int = Field(gt=0)


class QAStageConfig(StageConfig):
    max_turns: int = Field(gt=0)
    single_question_fraction: float = Field(ge=0, le=1)
    simple_scenes_first: bool  # a curriculum: the first pass over the scenes goes from 1 object to 4
    focus: list[FocusPhase]
    # At most this many questions of each type per scene and pass (drawn anew each pass), or None for all of
    # them: the evaluation asks every type equally often, the scenes do not (exists 31%, colour 13%, text 2%).
    max_questions_per_type: PositiveInt | None
    lora: LoraSettings

    @field_validator("focus", mode="before")
    @classmethod
    def _one_phase_or_none(cls, value: Any) -> Any:
        """`focus: null` and a single phase's mapping, as earlier recipes wrote them, stay valid."""
        return [] if value is None else [value] if isinstance(value, dict) else value

    @property
    def focus_steps(self) -> int:
        return sum(phase.steps for phase in self.focus)

    @model_validator(mode="after")
    def _focus_leaves_steps_for_the_mix(self) -> QAStageConfig:
        if self.focus_steps >= self.steps:
            raise ValueError(f"focus.steps ({self.focus_steps} in all) must be fewer than the stage's steps "
                             f"({self.steps})")
        return self


class RecipeConfig(BaseModel):
    """Everything that determines a run; a run folder keeps the one it was started with."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    # The vision-tower `hidden_states` the projector reads: one index, or several concatenated along channels.
    vision_feature_layer: int | list[int]
    image_size: int = Field(gt=0)  # px; a multiple of the tower's patch size (14): (size / 14)^2 visual tokens
    standardise_features: bool  # train the projector on per-channel standardised features (`FeatureScale`)
    train_scenes: int = Field(gt=0)
    precision: Precision
    threads: PositiveInt | None  # None: one per CPU core
    feature_batch_size: int = Field(gt=0)
    checkpoint_every: int = Field(gt=0)
    stage1: StageConfig
    stage2: QAStageConfig

    def stage(self, name: StageName) -> StageConfig:
        return getattr(self, name)

    def optimisation(self, name: StageName, precision: ResolvedPrecision) -> Optimisation:
        """The stage's schedule with the run's precision (`precision` resolved once for the run), checkpoint
        interval and seed, as the loop takes it."""
        schedule = AdamWSchedule.model_fields
        return Optimisation(**{key: getattr(self.stage(name), key) for key in schedule}, precision=precision,
                            checkpoint_every=self.checkpoint_every, seed=self.seed)


def parse_recipe(data: Any, source: str) -> RecipeConfig:
    """Validate a recipe mapping; the first problem becomes a one-line `RecipeError`."""
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
        raise RecipeError(f"recipe {source}: {where}: {first['msg']}{more}") from None


def load_recipe(path: Path = DEFAULT_RECIPE) -> RecipeConfig:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise RecipeError(f"cannot read recipe {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    return parse_recipe(data, str(path))


def smoke_recipe(config: RecipeConfig) -> RecipeConfig:
    """The same recipe cut to 4 steps per stage on 8 scenes: checks the wiring and times real steps."""
    short = {"steps": 4, "warmup_steps": 1}
    focus = [phase.model_copy(update={"steps": 1}) for phase in config.stage2.focus[:2]]
    return config.model_copy(update={
        "train_scenes": 8, "checkpoint_every": 2,
        "stage1": config.stage1.model_copy(update=short),
        "stage2": config.stage2.model_copy(update={**short, "focus": focus}),
    })


def recipe_yaml(config: RecipeConfig) -> str:
    return yaml.safe_dump(config.model_dump(), sort_keys=False)
