"""instructflow stages: pure logic per stage, plus one thin Prefect task wrapper each."""
