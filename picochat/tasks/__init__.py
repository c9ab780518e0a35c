"""Chat tasks for SFT, RL and chat evaluation: the framework is picochat.tasks.common, the data
download picochat.tasks.data, and each other module is one task."""
