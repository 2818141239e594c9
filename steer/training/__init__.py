"""The amplification loop: training files and their formats, datasets from stored traces,
graders, fine-tuning jobs, and the worker that runs TRL + peft in its own process."""
