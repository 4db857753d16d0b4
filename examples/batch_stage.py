"""A batch stage: the task converts a list of readings at a time; one bad reading among a thousand is dead-lettered
alone while every other reading is delivered.

    python examples/batch_stage.py
"""
import pipeline_cluster as pc


def to_fahrenheit(readings):  # a list in, a list of as many results out
    return [round(float(r) * 9 / 5 + 32, 1) for r in readings]


pipeline = pc.Pipeline([pc.Stage(to_fahrenheit, batch_size=100)], name="batch")

if __name__ == "__main__":
    readings = [str(n % 40) for n in range(1000)]
    readings[500] = "n/a"  # fails any list it is in: such lists are split in halves until it is alone
    with pc.LocalCluster() as cluster:
        converted = list(cluster.run(pipeline, readings))
        stats = cluster.stats()["to_fahrenheit"]
        failures = cluster.failures()
    print(f"{len(converted)} of {len(readings)} readings converted, {sum(converted):.1f} in all")
    print(f"{stats['failed']} failed, {stats['retried']} retried")
    for letter in failures:
        print(f"dead letter: {letter.item!r} after {letter.attempts} attempts: {letter.error_type}: {letter.message}")
