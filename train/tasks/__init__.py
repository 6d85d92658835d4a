"""Fine-tuning tasks (VQA, retrieval, captioning): data side, loss through the model's head,
and evaluation; one module per task, registered in ``TASKS`` (``base.py``)."""
