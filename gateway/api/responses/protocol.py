"""POST /v1/responses (CreateResponse -> Response, or the ResponseStreamEvent sequence): wire shapes.

Stateless: the request fields that refer to something stored (`previous_response_id`, `conversation`,
`prompt`, `store: true`, `background: true`) are declared so the service can refuse them by name.  Input
items are declared one Struct per kind; the service picks the kind by `type` (a message may omit it), so a
bad item is reported with its own path.  msgspec Structs; imports nothing of ours.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

__all__ = [
    "ContentPartAdded",
    "ContentPartDone",
    "ErrorEvent",
    "FunctionCallArgumentsDelta",
    "FunctionCallArgumentsDone",
    "FunctionCallInput",
    "FunctionCallOutput",
    "FunctionCallOutputInput",
    "IncompleteDetails",
    "InputMessage",
    "InputTokensDetails",
    "OutputItem",
    "OutputItemAdded",
    "OutputItemDone",
    "OutputMessage",
    "OutputText",
    "OutputTextDelta",
    "OutputTextDone",
    "OutputTokensDetails",
    "Response",
    "ResponseCompleted",
    "ResponseCreated",
    "ResponseError",
    "ResponseFailed",
    "ResponseInProgress",
    "ResponseIncomplete",
    "ResponseRequest",
    "ResponseUsage",
    "StreamEvent",
    "TextParam",
]

# -- the request -----------------------------------------------------------------------------------------


class TextParam(Struct, kw_only=True):
    format: dict[str, Any] | UnsetType = UNSET  # {"type": "text" | "json_object" | "json_schema", ...}
    verbosity: str | None = None


class ResponseRequest(Struct, kw_only=True):
    model: Annotated[str, Meta(min_length=1)]
    input: str | Annotated[list[dict[str, Any]], Meta(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    seed: int | None = None  # not in the spec; vLLM and our chat take it, so it is honoured here too
    text: TextParam | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    metadata: Annotated[dict[str, str], Meta(max_length=16)] | None = None
    stream: bool | None = None
    # stored state, refused: the gateway keeps no responses
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None


class InputMessage(Struct, kw_only=True):
    """EasyInputMessage / InputMessage / an earlier OutputMessage sent back: text or text parts."""

    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]
    type: Literal["message"] = "message"


class FunctionCallInput(Struct, kw_only=True):
    """A function call the model made earlier (FunctionToolCall), sent back as history."""

    call_id: Annotated[str, Meta(min_length=1)]
    name: Annotated[str, Meta(min_length=1)]
    arguments: str
    type: Literal["function_call"] = "function_call"


class FunctionCallOutputInput(Struct, kw_only=True):
    """The caller's result of one function call (FunctionCallOutputItemParam)."""

    call_id: Annotated[str, Meta(min_length=1)]
    output: str | list[dict[str, Any]]
    type: Literal["function_call_output"] = "function_call_output"


# -- the response ----------------------------------------------------------------------------------------


class OutputText(Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class OutputMessage(Struct, tag_field="type", tag="message"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]
    role: Literal["assistant"] = "assistant"


class FunctionCallOutput(Struct, tag_field="type", tag="function_call"):
    """The model's call of one of the request's function tools (FunctionToolCall)."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCallOutput


class InputTokensDetails(Struct, frozen=True):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(Struct, frozen=True):
    reasoning_tokens: int = 0


class ResponseUsage(Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()


class IncompleteDetails(Struct):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(Struct):
    code: str  # one of the spec's ResponseErrorCode values
    message: str


class Response(Struct, kw_only=True):
    id: str
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    model: str
    output: list[OutputItem]
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    metadata: dict[str, str]
    user: str | UnsetType = UNSET  # echoed when sent (the spec allows no null here)
    usage: ResponseUsage | UnsetType = UNSET  # once generation is done (the spec allows no null)
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    object: Literal["response"] = "response"
    previous_response_id: None = None
    store: bool = False
    background: bool = False
    truncation: Literal["disabled"] = "disabled"
    reasoning: None = None


# -- stream events (each carries `sequence_number`, counted from 0 per response) --------------------------


class ResponseCreated(Struct, tag_field="type", tag="response.created"):
    response: Response
    sequence_number: int = 0


class ResponseInProgress(Struct, tag_field="type", tag="response.in_progress"):
    response: Response
    sequence_number: int = 0


class ResponseCompleted(Struct, tag_field="type", tag="response.completed"):
    response: Response
    sequence_number: int = 0


class ResponseIncomplete(Struct, tag_field="type", tag="response.incomplete"):
    response: Response
    sequence_number: int = 0


class ResponseFailed(Struct, tag_field="type", tag="response.failed"):
    response: Response
    sequence_number: int = 0


class OutputItemAdded(Struct, tag_field="type", tag="response.output_item.added"):
    output_index: int
    item: OutputItem
    sequence_number: int = 0


class OutputItemDone(Struct, tag_field="type", tag="response.output_item.done"):
    output_index: int
    item: OutputItem
    sequence_number: int = 0


class ContentPartAdded(Struct, tag_field="type", tag="response.content_part.added"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int = 0


class ContentPartDone(Struct, tag_field="type", tag="response.content_part.done"):
    item_id: str
    output_index: int
    content_index: int
    part: OutputText
    sequence_number: int = 0


class OutputTextDelta(Struct, tag_field="type", tag="response.output_text.delta"):
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = []
    sequence_number: int = 0


class OutputTextDone(Struct, tag_field="type", tag="response.output_text.done"):
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = []
    sequence_number: int = 0


class FunctionCallArgumentsDelta(Struct, tag_field="type", tag="response.function_call_arguments.delta"):
    item_id: str
    output_index: int
    delta: str
    sequence_number: int = 0


class FunctionCallArgumentsDone(Struct, tag_field="type", tag="response.function_call_arguments.done"):
    item_id: str
    output_index: int
    name: str
    arguments: str
    sequence_number: int = 0


class ErrorEvent(Struct, tag_field="type", tag="error"):
    message: str
    code: str | None
    param: str | None
    sequence_number: int = 0


StreamEvent = (
    ResponseCreated
    | ResponseInProgress
    | ResponseCompleted
    | ResponseIncomplete
    | ResponseFailed
    | OutputItemAdded
    | OutputItemDone
    | ContentPartAdded
    | ContentPartDone
    | OutputTextDelta
    | OutputTextDone
    | FunctionCallArgumentsDelta
    | FunctionCallArgumentsDone
    | ErrorEvent
)
