"""What a preference example and a data file are: the ground floor that `tisdpo.data` (loading, tokenisation,
collation), `tisdpo.validation` (checks of user input) and `tisdpo.weights` (estimation) share.

- Raw examples (TRL's preference formats): `{"prompt", "chosen", "rejected"}` as texts or as lists of chat
  messages `{"role", "content"}`, or an implicit prompt (`{"chosen", "rejected"}` sharing a prefix, split off by
  `extract_prompt`); optional per-token weight columns `chosen_weights` / `rejected_weights`.
- Tokenised rows: the columns `PROMPT_IDS`, `CHOSEN_IDS`, `REJECTED_IDS` (response tokens only), the weight
  columns and the per-token reference log-prob columns; TRL's tokenised column names map onto ours.
- Data files: the extensions read and written, and the `datasets` builder of each (`DATA_FILE_BUILDERS`).
- A pair that teaches nothing (`pair_drop_reason`): identical responses, or an empty one.

Standard library only (`tisdpo --help` imports `tisdpo.validation`, which imports this module).
"""

from __future__ import annotations

from typing import Any

# raw examples
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
CHOSEN_WEIGHTS = "chosen_weights"
REJECTED_WEIGHTS = "rejected_weights"
WEIGHT_COLUMNS = (CHOSEN_WEIGHTS, REJECTED_WEIGHTS)

# tokenised rows (tisdpo.data.prepare_preference_dataset)
PROMPT_IDS = "prompt_input_ids"
CHOSEN_IDS = "chosen_input_ids"
REJECTED_IDS = "rejected_input_ids"
REF_CHOSEN_LOGPS = "ref_chosen_token_logps"
REF_REJECTED_LOGPS = "ref_rejected_token_logps"
REF_COLUMNS = (REF_CHOSEN_LOGPS, REF_REJECTED_LOGPS)
TOKENIZED_COLUMNS = (PROMPT_IDS, CHOSEN_IDS, REJECTED_IDS, *WEIGHT_COLUMNS, *REF_COLUMNS)
# TRL DPOTrainer's tokenised columns -> ours (same contents: prompt tokens, response tokens with EOS)
TRL_TOKENIZED_COLUMNS = {"prompt_ids": PROMPT_IDS, "chosen_ids": CHOSEN_IDS, "rejected_ids": REJECTED_IDS}

# how an example becomes a tokenised row (tisdpo.data.tokenize_row; TISDPOConfig's fields of these names)
TRUNCATION_MODES = ("keep_end", "keep_start")
TOKENIZATION_MODES = ("separate", "joint")

# data files: extension -> the `datasets` builder that reads it
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
DATA_EXTENSIONS = tuple(DATA_FILE_BUILDERS)


def is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def is_conversational(example: dict[str, Any]) -> bool:
    """True when the example's `chosen` (and so the whole example) is a list of chat messages."""
    return is_messages(example.get("chosen"))


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """Split an implicit-prompt pair into `(prompt, chosen_response, rejected_response)`.

    Dialogues (message lists): the prompt is the longest common run of leading messages. Texts: the prompt is
    the longest common prefix, moved back to the start of the word where the texts diverge and then before the
    spaces that precede that word, so the response starts with its separating space (`"...Assistant:"`,
    `" Sure"`), which is how word-piece tokenizers attach spaces.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        i = 0
        limit = min(len(chosen), len(rejected))
        while i < limit and chosen[i] == rejected[i]:
            i += 1
        if i < limit or len(chosen) != len(rejected):  # they diverge (or one continues the other)
            while i > 0 and not chosen[i - 1].isspace():
                i -= 1
            while i > 0 and chosen[i - 1] == " ":
                i -= 1
        return chosen[:i], chosen[i:], rejected[i:]
    if is_messages(chosen) and is_messages(rejected):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        return chosen[:i], chosen[i:], rejected[i:]
    raise TypeError(
        "`chosen` and `rejected` must both be strings or both be lists of {'role', 'content'} messages, got "
        f"{type(chosen).__name__} and {type(rejected).__name__}"
    )


def _blank(response: Any) -> bool:
    if response is None:
        return True
    if isinstance(response, str):
        return not response.strip()
    if isinstance(response, list):
        return all(isinstance(m, dict) and not str(m.get("content") or "").strip() for m in response)
    return False


def pair_drop_reason(example: dict[str, Any]) -> str | None:
    """Why a raw preference example teaches nothing, or None: `"identical"` (the chosen and rejected responses
    are the same), `"empty chosen"` / `"empty rejected"` (a response, after removing the prompt, is empty or only
    whitespace). Examples of types `tokenize_row` rejects are left for it to report."""
    chosen, rejected = example.get("chosen"), example.get("rejected")
    if example.get("prompt") is None and chosen is not None and rejected is not None:
        try:
            _, chosen, rejected = extract_prompt(chosen, rejected)
        except TypeError:
            return None
    if chosen == rejected:
        return "identical"
    if _blank(chosen):
        return "empty chosen"
    if _blank(rejected):
        return "empty rejected"
    return None
