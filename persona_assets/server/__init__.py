"""`persona serve`: Segment's tracking API into landing, durable before each 200, and a profile API
on the serving snapshot. `config` reads the keys and limits, `collect` turns requests into
landing lines checked by the landing contract, `spool` makes them durable and moves them into
landing, `profiles` reads the snapshot, `app` puts them behind HTTP."""
