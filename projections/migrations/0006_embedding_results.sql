-- 0006: embed models' answers (events.registry, task "embed"). An embedding is stored with its
-- result, as the JSON array the event carried (NULL for a generate model's completion, whose text
-- stays in `completion`; an embedding's `completion` is '').
ALTER TABLE inference_results ADD COLUMN embedding jsonb;
