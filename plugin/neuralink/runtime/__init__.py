"""Stage 4, runtime: ``neuralink.Llama`` and the FFN hook, memory budgets, and the storage it reads from."""
