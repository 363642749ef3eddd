"""The fleet store: samples as Parquet files in Hive partitions (``parquet``), their compaction
(``compaction``) and SQL over them with DuckDB (``query``). The only cloud package that imports pyarrow
or duckdb."""
