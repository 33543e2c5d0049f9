-- 0008: the quota rebuild reads the per-window totals from the daily aggregate, not from the ledger's rows.
--
-- token_usage_daily (0001) is maintained in the very statement that inserts a ledger row, and only by the
-- rows that statement really inserted (projections.postgres._CHARGE_USAGE), so it is exactly-once like the
-- ledger. A rebuild of the Redis counters (quota.store.PostgresLedgerSource) sums it per user over the
-- current month's days: O(users x days x models) rows, however many requests the day held. The index
-- makes that a range scan of the month instead of a scan of the whole history; `mlp replay` recreates it
-- with the table (it copies every index of the live table).
CREATE INDEX token_usage_daily_day ON token_usage_daily (day);

-- Every service that holds a QuotaService may run the rebuild (0005: the gateway and the worker read the
-- ledger for it; the collector and the read API read this table already).
GRANT SELECT ON token_usage_daily TO mlp_gateway, mlp_worker;
