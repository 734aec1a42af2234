#!/usr/bin/env python3
"""Rebuild the rows added to tests/data/eval for issue 22 (profiles that learn from rows).

Each file keeps its original rows (the first ORIGINAL[name] lines, untouched: their tune/test
split is what docs/performance.md reports on) and gets the rows built here after them:

- loghub_openssh_classify: real OpenSSH lines from ../shared/eval/loghub2k (labeled by their
  event template, as the original rows were) up to 25 rows for break_in_attempt; the 2k
  sample holds only 2 successful logins and 1 closed session, so those two labels get
  hand-written lines in sshd's own formats (source "hand-written/sshd") to reach 20 each.
- sensor_classify: hand-written messages up to 12 per label for both label sets.
- sensor_extract: hand-written messages up to 10 or more per schema.

Run from the repository root: python3 scripts/build_eval_rows.py [--loghub DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
EVAL = Path("tests/data/eval")
ORIGINAL = {
    "loghub_openssh_classify.jsonl": 82,
    "sensor_classify.jsonl": 30,
    "sensor_extract.jsonl": 10,
}
SSH_LABELS = ["auth_failure", "break_in_attempt", "disconnect", "invalid_user",
              "login_success", "session_closed"]  # fmt: skip
SEVERITY = ["normal", "warning", "critical"]
CATEGORY = ["temperature", "vibration", "power", "security", "logistics"]

USERS = ["alice", "deploy", "backup", "jenkins", "mkoch", "ops", "root", "git", "pi", "svc-mon",
         "lena", "ubuntu", "ansible", "nagios", "tomas", "admin", "build", "ftpuser", "wei",
         "carlos"]  # fmt: skip


def ssh_hand_written(rng: random.Random) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(18):
        user = USERS[i]
        ip = f"10.{rng.randint(0, 40)}.{rng.randint(0, 254)}.{rng.randint(2, 254)}"
        port = rng.randint(30000, 65000)
        form = i % 3
        if form == 0:
            text = f"Accepted password for {user} from {ip} port {port} ssh2"
        elif form == 1:
            key = "".join(rng.choice(BASE64) for _ in range(43))
            text = f"Accepted publickey for {user} from {ip} port {port} ssh2: RSA SHA256:{key}"
        else:
            text = f"pam_unix(sshd:session): session opened for user {user} by (uid=0)"
        rows.append({"source": "hand-written/sshd", "text": text, "labels": SSH_LABELS,
                     "label": "login_success"})  # fmt: skip
    for i in range(19):
        user = USERS[(i + 5) % len(USERS)]
        if i % 2 == 0:
            text = f"pam_unix(sshd:session): session closed for user {user}"
        else:
            text = f"pam_systemd(sshd:session): session closed for user {user}"
        rows.append({"source": "hand-written/sshd", "text": text, "labels": SSH_LABELS,
                     "label": "session_closed"})  # fmt: skip
    return rows


def ssh_loghub(loghub: Path, taken: set[int]) -> list[dict[str, object]]:
    path = loghub / "OpenSSH" / "OpenSSH_2k.log_structured.csv"
    with path.open(newline="") as f:
        lines = list(csv.DictReader(f))
    out: list[dict[str, object]] = []
    for line in lines:
        line_id = int(line["LineId"])
        if line["EventId"] != "E27" or line_id in taken:
            continue
        if len(out) == 21:
            break
        out.append({"source": "loghub/OpenSSH_2k", "line_id": line_id,
                    "text": line["Content"], "labels": SSH_LABELS,
                    "label": "break_in_attempt"})  # fmt: skip
    return out


SEVERITY_ROWS = {
    "normal": [
        "Boiler B-2 flow temperature 68 C, within schedule.",
        "Air handler AHU-4 filter pressure drop 110 Pa, fine.",
        "Water meter WM-3 logged 14.2 m3 today, usual for a Tuesday.",
        "Freezer room 1 at -21 C, door closed.",
        "Weekly generator test run finished without faults.",
        "Backup of the access control server completed at 02:00.",
        "Conveyor C-5 running at 1.2 m/s as set.",
    ],
    "warning": [
        "Compressor K-2 oil temperature 8 C above normal, check at next round.",
        "Sensor node n-31 has not reported for 20 minutes.",
        "UPS battery health 70 percent, plan a replacement.",
        "Humidity in archive room 2 at 64 percent, above the 60 percent limit.",
        "Bearing temperature on pump P-7 rising slowly for a week.",
        "Fuel tank of generator G-1 at 25 percent.",
        "Certificate of gateway gw-04 expires in 9 days.",
    ],
    "critical": [
        "Carbon monoxide 220 ppm in the underground garage, ventilation failed.",
        "Main breaker tripped, whole building without power.",
        "Water flooding the server room floor, 3 cm and rising.",
        "Cold store temperature 14 C for two hours, vaccines at risk.",
        "Gas pressure regulator failed open, line pressure 5 times nominal.",
        "Fire alarm zone 4 confirmed by two detectors.",
        "Crane C-1 load limiter failed during a lift.",
    ],
}

CATEGORY_ROWS = {
    "temperature": [
        "Cold room 3 holding at 2.5 C.",
        "Oven zone 2 reached 240 C setpoint.",
        "Outdoor unit reports 38 C ambient.",
        "Battery cabinet at 29 C, fans on.",
        "Greenhouse night temperature fell to 9 C.",
        "Thermocouple TC-8 on the kiln reads 1120 C.",
        "Reefer container MSKU-4 setpoint 5 C reached.",
        "Heat exchanger outlet 55 C, inlet 70 C.",
        "Office floor 2 too warm at 27 C.",
    ],
    "vibration": [
        "Accelerometer on motor M-4 reads 7.1 mm/s RMS.",
        "Fan F9 blade imbalance detected by vibration monitor.",
        "Pump P-2 shows rising 2x running speed amplitude.",
        "Chiller compressor vibration back to 2.0 mm/s after repair.",
        "Conveyor roller 18 rattles, bearing wear suspected.",
        "Wind turbine tower oscillation above limit in gusts.",
        "Press line 1 vibration alarm during stamping.",
        "Cooling tower fan shaking at high speed.",
        "Gearbox G1 kurtosis value 6.3, impacts likely.",
    ],
    "power": [
        "Phase L2 voltage sag to 190 V for 300 ms.",
        "Generator G-2 took the load in 8 seconds.",
        "Power factor on feeder 3 dropped to 0.78.",
        "Inverter INV-1 offline, no AC output.",
        "Main meter shows 412 kW peak demand.",
        "Battery bank discharged to 48 V overnight.",
        "Breaker CB-14 opened on earth fault.",
        "Charger at bay 6 drawing 22 kW.",
        "Mains frequency 49.6 Hz for ten minutes.",
    ],
    "security": [
        "Camera 12 lost video signal, cable cut suspected.",
        "Unknown badge tried the server room door three times.",
        "Window sensor W-4 opened at 03:12.",
        "Perimeter fence sensor tripped in sector B.",
        "Alarm panel disarmed with a code not in use since May.",
        "Tailgating detected at turnstile 2.",
        "Glass break sensor triggered in shop front.",
        "Visitor badge still active after checkout.",
        "Intrusion alarm in the substation, guard dispatched.",
    ],
    "logistics": [
        "Pallet 5521 scanned at outbound dock 2.",
        "Truck TR-19 departed with 18 pallets for Lyon.",
        "Parcel 88-2041 delivered to reception.",
        "Inbound shipment from supplier Kalt 2 hours late.",
        "Picking wave 14 finished, 312 lines.",
        "Container TGHU-7 loaded onto the vessel.",
        "Stock of item KX-9 below reorder point.",
        "Van V-4 reached its last drop at 16:40.",
        "Return 7710 received and restocked.",
    ],
}

READINGS = [  # (text, device, metric, value, unit)
    ("Humidity sensor HM-3 in store room 4 reads 55.2 %.", "HM-3", "humidity", 55.2, "%"),
    ("Flow meter FM-11 reports flow 12.5 m3/h on line B.", "FM-11", "flow", 12.5, "m3/h"),
    ("CO2 sensor CO-2 shows 870 ppm in meeting room 1.", "CO-2", "co2", 870, "ppm"),
    ("Meter EM-7: current 16.4 A on phase L1.", "EM-7", "current", 16.4, "A"),
    ("Probe TS-44 measured temperature -18.5 C in freezer 2.", "TS-44", "temperature", -18.5, "C"),
    ("Gauge PG-2 pressure 6.3 bar at the compressor outlet.", "PG-2", "pressure", 6.3, "bar"),
    ("Level sensor LV-8 reports level 2.35 m in tank 7.", "LV-8", "level", 2.35, "m"),
    ("Vibration sensor VB-21 on pump P4 reads 2.8 mm/s.", "VB-21", "vibration", 2.8, "mm/s"),
]
ORDERS = [  # (order_id, customer, quantity, item, city)
    ("9071", "Novak", 12, "AB-3", "Prague"),
    ("55", "Okafor", 200, "ZT-40", "Lagos"),
    ("30118", "Lindqvist", 1, "PX-2", "Uppsala"),
    ("772", "Moreau", 36, "LM-8", "Lyon"),
    ("1204", "Tanaka", 8, "QR-11", "Osaka"),
    ("4499", "Ferreira", 15, "KX-9", "Braga"),
    ("610", "Schmidt", 3, "HD-7", "Bremen"),
    ("8825", "Kowalski", 60, "PL-1", "Gdansk"),
]
SERVICE = [  # (technician, action, asset, date)
    ("Jonas Weber", "replaced", "pump P-7", "2026-03-14"),
    ("Mei Lin", "calibrated", "sensor TS-4", "2026-01-20"),
    ("Omar Haddad", "cleaned", "filter F-22", "2026-04-02"),
    ("Sara Nilsen", "inspected", "boiler B-1", "2026-05-11"),
    ("Paul Grant", "lubricated", "bearing BR-3", "2026-02-27"),
    ("Ines Duarte", "tested", "valve V-30", "2026-06-08"),
    ("Kofi Mensah", "repaired", "conveyor C-2", "2026-07-19"),
    ("Lea Roth", "replaced", "fan F-5", "2026-08-03"),
    ("Ana Costa", "calibrated", "meter EM-2", "2026-09-15"),
]
SERVICE_FORMS = [
    "Technician {t} {a} {s} on {d}.",
    "On {d}, technician {t} {a} {s}.",
    "{t} (technician) {a} {s} on {d}.",
]
ARRIVALS = [  # (vehicle, dock, time, pallets)
    ("TR-12", 1, "06:15", 20),
    ("VN-3", 4, "11:02", 2),
    ("PL-80", 2, "14:30", 33),
    ("TR-5", 6, "07:45", 18),
    ("LK-201", 3, "16:20", 9),
    ("PL-9", 5, "08:05", 26),
    ("TR-33", 2, "22:40", 14),
    ("VN-18", 1, "13:55", 4),
    ("PL-61", 7, "05:30", 30),
]
ARRIVAL_FORMS = [
    "Truck {v} arrived at dock {d} at {t} with {p} pallets.",
    "Dock {d}: truck {v} in at {t}, {p} pallets.",
    "At {t} truck {v} docked at dock {d} carrying {p} pallets.",
]


def sensor_classify_rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(9):  # interleave labels, as the original rows are
        for label in SEVERITY:
            if i < len(SEVERITY_ROWS[label]):
                rows.append({"source": "hand-written", "text": SEVERITY_ROWS[label][i],
                             "labels": SEVERITY, "label": label})  # fmt: skip
        for label in CATEGORY:
            rows.append({"source": "hand-written", "text": CATEGORY_ROWS[label][i],
                         "labels": CATEGORY, "label": label})  # fmt: skip
    return rows


def sensor_extract_rows() -> list[dict[str, object]]:
    reading = {"device": "string", "metric": "string", "value": "number", "unit": "string"}
    order = {"order_id": "string", "customer": "string", "quantity": "integer",
             "item": "string", "city": "string"}  # fmt: skip
    service = {"technician": "string", "action": "string", "asset": "string", "date": "string"}
    arrival = {"vehicle": "string", "dock": "integer", "time": "string", "pallets": "integer"}
    rows: list[dict[str, object]] = []

    def add(text: str, fields: dict[str, str], expected: dict[str, object]) -> None:
        rows.append({"source": "hand-written", "text": text, "fields": fields,
                     "expected": expected})  # fmt: skip

    for n in range(9):
        if n < len(READINGS):
            text, device, metric, value, unit = READINGS[n]
            add(text, reading, {"device": device, "metric": metric, "value": value, "unit": unit})
        if n < len(ORDERS):
            o, c, q, item, city = ORDERS[n]
            form = (
                "Order {o} for customer {c}: {q} units of item {i}, ship to {y}."
                if n % 2
                else "Customer {c} placed order {o}: {q} x {i}, deliver to {y}."
            )
            add(
                form.format(o=o, c=c, q=q, i=item, y=city),
                order,
                {"order_id": o, "customer": c, "quantity": q, "item": item, "city": city},
            )
        t, a, s, d = SERVICE[n]
        add(
            SERVICE_FORMS[n % 3].format(t=t, a=a, s=s, d=d),
            service,
            {"technician": t, "action": a, "asset": s, "date": d},
        )
        v, dock, time, pallets = ARRIVALS[n]
        add(
            ARRIVAL_FORMS[n % 3].format(v=v, d=dock, t=time, p=pallets),
            arrival,
            {"vehicle": v, "dock": dock, "time": time, "pallets": pallets},
        )
    return rows


def rebuild(name: str, added: list[dict[str, object]]) -> None:
    path = EVAL / name
    kept = path.read_text().splitlines()[: ORIGINAL[name]]
    lines = kept + [json.dumps(row, ensure_ascii=False) for row in added]
    path.write_text("\n".join(lines) + "\n")
    print(f"{path}: {len(kept)} original rows + {len(added)} built")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loghub", type=Path, default=Path("../shared/eval/loghub2k"))
    args = ap.parse_args()
    rng = random.Random(22)  # noqa: S311 - reproducible test data, not secrets
    original = [json.loads(line) for line in
                (EVAL / "loghub_openssh_classify.jsonl").read_text().splitlines()
                [: ORIGINAL["loghub_openssh_classify.jsonl"]]]  # fmt: skip
    taken = {int(r["line_id"]) for r in original if "line_id" in r}
    ssh = ssh_loghub(args.loghub, taken) + ssh_hand_written(rng)
    rebuild("loghub_openssh_classify.jsonl", ssh)
    rebuild("sensor_classify.jsonl", sensor_classify_rows())
    rebuild("sensor_extract.jsonl", sensor_extract_rows())


if __name__ == "__main__":
    main()
