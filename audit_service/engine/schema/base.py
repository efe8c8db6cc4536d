"""The base of the report's models: unknown keys kept (refused under ``STRICT``), a model dumps back the JSON
it was read from."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator

#: the statistics of a summary over values, as the report names them (``metrics.summarize``, the sensitivity)
STATISTICS = {"mean": "the mean", "p5": "the 5th percentile", "p50": "the median", "p95": "the 95th percentile"}

#: ``model_validate(..., context={STRICT: True})`` refuses keys a model does not declare
STRICT = "forbid_unmodelled_keys"


class ReportModel(BaseModel):
    """Base of the report's models: unknown keys kept (and refused under ``STRICT``), fields by their JSON name."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unmodelled(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get(STRICT):
            known = {f.alias or name for name, f in cls.model_fields.items()} | set(cls.model_fields)
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                raise ValueError(
                    f"{cls.__name__} does not model the key(s) {unknown}: add them to "
                    f"{cls.__module__} (and regenerate the OpenAPI Report)"
                )
        return data

    def to_json(self) -> dict[str, Any]:
        """The JSON dict this model was read from (the keys it was given, none added)."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)

    def __getitem__(self, key: str) -> Any:
        """``section["key"]``, for callers written against the JSON (``result.model["format"]``); a KeyError
        names the keys there are."""
        if key in self.model_fields_set or key in (self.model_extra or {}):
            return getattr(self, key)
        raise KeyError(f"{type(self).__name__} has no key {key!r}; it has {sorted(self.to_json())}")


def statistic(name: str, of: str) -> Any:
    """A required field holding one statistic (``STATISTICS``) of ``of``, described once for every summary."""
    return Field(description=f"{STATISTICS[name]} of {of}")
