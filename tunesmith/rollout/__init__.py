"""Rollouts for the RL methods: prompts, sampling from the policy, rewards, and training rows of completions."""
