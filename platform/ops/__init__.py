"""The top floor: operator tools (the ``mlp`` CLI, ``up``, ``docs``, ``dlq``, ``replay``, ``migrate``,
``quota``, ``bench``). They import the services and the plumbing below them; nothing imports them."""
