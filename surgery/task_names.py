"""The task heads by name, as data: what `--task` accepts and the transformers auto class each one builds.

Apart from `surgery/tasks.py` (which wraps the models in torch) so that the command line can name the tasks in its
help without importing torch.
"""

FEATURE_EXTRACTION = "feature-extraction"
CAUSAL_LM = "causal-lm"
SEQUENCE_CLASSIFICATION = "sequence-classification"
TOKEN_CLASSIFICATION = "token-classification"
SPEECH_RECOGNITION = "automatic-speech-recognition"
# task -> (transformers auto class, the name of its mapping of model types to classes)
TASKS: dict[str, tuple[str, str]] = {
    FEATURE_EXTRACTION: ("AutoModel", "MODEL_MAPPING_NAMES"),
    CAUSAL_LM: ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    SEQUENCE_CLASSIFICATION: ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    TOKEN_CLASSIFICATION: ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    SPEECH_RECOGNITION: ("AutoModelForSpeechSeq2Seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
}
TASK_HELP = "Head to capture: " + ", ".join(TASKS) + " (default: from the config's architectures)."
