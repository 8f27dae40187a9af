"""The exceptions workbench raises for bad input. Each message names what was wrong and what is allowed."""


class WorkbenchError(Exception):
    """Base class: every error a user can fix by changing their input."""


class UnknownComponentError(WorkbenchError, KeyError):
    """A component name that is not registered in its family."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0])


class ParameterError(WorkbenchError, ValueError):
    """A component parameter that does not exist or has a bad value."""


class ModelLoadError(WorkbenchError):
    """A model that cannot be found or is not a causal language model."""


class PromptError(WorkbenchError, ValueError):
    """A prompt that cannot be generated from (too long for the model, wrong type)."""


class UnsupportedError(WorkbenchError):
    """A model feature a component cannot honour (e.g. learned attention sinks under a softmax-free variant):
    refused rather than silently dropped."""
