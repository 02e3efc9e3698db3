"""The learning system: world model, actor-critic, goals and the agent that owns them."""
