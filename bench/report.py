"""RESULTS.md and results.svg, written from the measurements in results.json (never by hand)."""

from __future__ import annotations

import math
import statistics
from html import escape
from typing import Any

Results = dict[str, Any]


def median(values: list[float]) -> float:
    clean = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(clean) if clean else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _runs(values: list[float], fmt: str = "{:.0f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def _verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**FAIL**"


# -- targets ---------------------------------------------------------------


def targets(r: Results) -> list[tuple[str, bool, str]]:
    """(target, passed, the numbers) for every target of issues 4 and 11 that this run measured."""
    out: list[tuple[str, bool, str]] = []
    tp = r.get("throughput")
    if tp:
        base = median([s["good_rps"] for s in tp["baseline"]])
        hit = median([s["good_rps"] for s in tp["hit"]])
        miss = median([s["good_rps"] for s in tp["miss"]])
        out.append(("Authorize cache-hit throughput >= 90% of the empty-handler baseline", hit >= 0.9 * base,
                    f"{hit:.0f} vs {base:.0f} req/s = {hit / base:.1%}"))
        out.append(("Authorize cache-miss throughput >= 60% of the baseline", miss >= 0.6 * base,
                    f"{miss:.0f} vs {base:.0f} req/s = {miss / base:.1%}"))
        if tp.get("hit_metrics"):
            on = median([s["good_rps"] for s in tp["hit_metrics"]])
            out.append(("Cache-hit throughput with metrics on >= 95% of metrics off", on >= 0.95 * hit,
                        f"{on:.0f} vs {hit:.0f} req/s = {on / hit:.1%}"))
    serial = r.get("serial")
    if serial:
        b = median([s["p50_ms"] for s in serial["baseline"]])
        h = median([s["p50_ms"] for s in serial["hit"]])
        out.append(("Serial p50 latency of a cache hit within 0.1 ms of the baseline", h - b <= 0.1,
                    f"{h:.3f} vs {b:.3f} ms = +{h - b:.3f} ms"))
    env = r.get("envoy")
    if env:
        ok = median([s["rps"] for s in env["ok_check"]])
        au = median([s["rps"] for s in env["authsvc"]])
        bad = sum(s["non_2xx"] for s in env["authsvc"] + env["ok_check"])
        out.append(("Envoy path with authsvc's Check >= 90% of the always-OK Check baseline",
                    au >= 0.9 * ok and bad == 0,
                    f"{au:.0f} vs {ok:.0f} req/s = {au / ok:.1%} ({bad} non-2xx answers)"))
    eh = r.get("envoy_http")
    if eh:
        au = median([s["rps"] for s in eh["authsvc_http"]])
        ok_http = median([s["rps"] for s in eh["ok_http"]])
        ok_grpc = median([s["rps"] for s in eh["ok_check"]])
        bad = sum(s["non_2xx"] + s["serial_non_2xx"] for name in eh for s in eh[name])
        out.append(("Envoy HTTP mode: authsvc (cache hit) >= 85% of the always-OK HTTP stand-in",
                    au >= 0.85 * ok_http, f"{au:.0f} vs {ok_http:.0f} req/s = {au / ok_http:.1%}"))
        out.append(("Envoy HTTP mode: authsvc >= 3x the always-OK gRPC Check stand-in, same run",
                    au >= 3 * ok_grpc, f"{au:.0f} vs {ok_grpc:.0f} req/s = {au / ok_grpc:.2f}x"))
        a50 = median([s["serial_p50_ms"] for s in eh["authsvc_http"]])
        o50 = median([s["serial_p50_ms"] for s in eh["ok_http"]])
        out.append(("Envoy HTTP mode: serial p50 within 0.1 ms of the HTTP stand-in", a50 - o50 <= 0.1,
                    f"{a50:.3f} vs {o50:.3f} ms = +{a50 - o50:.3f} ms"))
        out.append(("Envoy HTTP mode: 0 wrong answers (wrk non-2xx, sampled bodies)", bad == 0,
                    f"{bad} non-2xx answers; bodies sampled before and after every run"))
    rev = r.get("revocation")
    if rev:
        lat = [s["latency_ms"] for s in rev["samples"] if s["latency_ms"] is not None]
        missing = sum(1 for s in rev["samples"] if s["latency_ms"] is None)
        p99 = percentile(lat, 0.99)
        late = sum(s["late_allows"] + s["allows_after_denial"] for s in rev["samples"])
        out.append(("Revocation visible on every other replica: p99 <= 50 ms", p99 <= 50 and missing == 0,
                    f"p99 {p99:.2f} ms over {len(lat)} revocation x replica pairs ({missing} never denied)"))
        out.append(("0 allows of a revoked key after 50 ms", late == 0, f"{late} late allows"))
        server = rev.get("server_lag")
        if server:
            p50 = percentile(lat, 0.5)
            out.append(("authsvc_invalidation_lag_seconds p50 within 3 ms of the client-side p50",
                        abs(server["p50_ms"] - p50) <= 3,
                        f"{server['p50_ms']:.2f} ms (metrics, {server['observations']:.0f} evictions) "
                        f"vs {p50:.2f} ms (client)"))
        loss = rev["losses"]
        loss_allows = sum(s["late_allows"] + s["allows_after_denial"] for s in loss)
        first_allows = sum(s["polls"] - s["unavailable"] for s in loss if s["latency_ms"] is None)
        out.append(("0 allows ever after a listener loss", loss_allows == 0 and first_allows == 0,
                    f"{loss_allows} allows in {len(loss)} rounds (backends of the replica killed, then revoked)"))
    rl = r.get("ratelimit")
    if rl and rl["shared"]:
        windows = [w for run in rl["shared"] for w in run["windows"]]
        worst = max(w["ratio"] for w in windows)
        early = sum(1 for w in windows if w["early_429"])
        out.append(("Rate limit across 2 replicas: admitted <= 1.05 x limit per window", worst <= 1.05,
                    f"worst window {worst:.3f} x limit over {len(windows)} windows"))
        out.append(("No 429 below 0.9 x limit", early == 0, f"{early} windows had a 429 below 0.9 x limit"))
    mem = r.get("memory")
    if mem:
        inproc = mem["inprocess"]["bytes_per_key"]
        proc = mem["process"]["bytes_per_key"]
        out.append(("<= 1 KiB of memory per cached key (at 1M keys)", inproc <= 1024,
                    f"{inproc:.0f} B/key at {mem['inprocess']['entries']:,} keys in-process; "
                    f"{proc:.0f} B/key in a real authsvc process at {mem['process']['keys']:,} keys"))
    cc = r.get("clientcache")
    if cc:
        rate, rev, fan, mem = cc["rate"], cc["revocation"], cc["fanout"], cc["memory"]
        out.append(("Cached authorize() in one asyncio client >= 200,000/s and >= 50x cache_size=0",
                    rate["cached_per_s"] >= 200_000 and rate["ratio"] >= 50,
                    f"{rate['cached_per_s']:.0f}/s vs {rate['uncached_per_s']:.0f}/s = {rate['ratio']:.0f}x"))
        out.append(("Revocation into 4 client processes (2 replicas): p99 <= 50 ms, 0 allows after the first denial",
                    rev["p99_ms"] is not None and rev["p99_ms"] <= 50 and rev["allows_after_denial"] == 0
                    and rev["never_denied"] == 0,
                    f"p99 {rev['p99_ms']:.1f} ms over {rev['revocations']} revocations, "
                    f"{rev['allows_after_denial']} allows after denial, {rev['never_denied']} never denied"))
        out.append((f"Fan-out to {fan['streams']} client streams on one server: revocation p99 <= 100 ms",
                    fan["p99_ms"] is not None and fan["p99_ms"] <= 100 and fan["never_denied"] == 0,
                    f"p99 {fan['p99_ms']:.1f} ms (p50 {fan['p50_ms']:.1f}) from sending RevokeKey to the "
                    f"invalidation on each stream, {fan['revocations']} revocations x {fan['streams']} streams, "
                    f"{fan['never_denied']} never delivered; server RSS {fan['server_rss_kib']} KiB"))
        out.append(("<= 1 KiB per cached key in the client", mem["bytes_per_key"] <= 1024,
                    f"{mem['bytes_per_key']:.0f} bytes over {mem['keys']} keys"))
    ov = r.get("overload")
    if ov:
        out += _overload_targets(ov)
    return out


def _overload_targets(ov: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """Issue 10's targets (``bench/overload.py``)."""
    f, t, rd = ov["flood"], ov["tenfold"], ov["redis"]
    c, idle = f["cached"], f["idle_cached"]
    sweep = "; ".join(f"{n} in flight: {lv['forged_rps']:.0f}/s, p99 {lv['cached']['p99_ms']:.1f} ms"
                      + (f", server {lv['cpu']['server_pct']:.0f}%, PostgreSQL {lv['cpu']['postgres_pct']:.0f}%"
                         + (f", flood client {lv['cpu']['flood_pct']:.0f}%" if "flood_pct" in lv["cpu"] else "")
                         + " of a core" if "cpu" in lv else "")
                      for n, lv in f.get("levels", {}).items())
    ctl = f.get("control")
    if ctl is not None:
        worst = ctl["cached"]["p99_ms"] / ctl["idle_cached"]["p99_ms"]
        sweep += (f". Control (empty-handler stand-in, same floods): p99 {ctl['cached']['p99_ms']:.2f} vs "
                  f"{ctl['idle_cached']['p99_ms']:.2f} ms idle ({worst:.1f}x) at {ctl['forged_rps']:.0f} calls/s"
                  + (" - no grpc.aio server meets this here" if worst > 5 else ""))
    rows = [
        ("Forged-key flood: a cached key keeps >= 99.9% success, p99 <= 5x unloaded",
         c["allowed_fraction"] >= 0.999 and c["p99_ms"] <= 5 * idle["p99_ms"],
         f"{c['allowed_fraction']:.2%}, p99 {c['p99_ms']:.2f} vs {idle['p99_ms']:.2f} ms idle, "
         f"under {f['forged_rps']:.0f} forged keys/s" + (f" (floods of {sweep})" if sweep else "")),
        ("Forged-key flood: uncached valid keys keep >= 99% success", f["uncached"]["allowed_fraction"] >= 0.99,
         f"{f['uncached']['allowed_fraction']:.2%} of {f['uncached']['calls']} calls"),
    ]
    if "runs" not in t:  # a record from before the control and the pinning (2026-12-02b and older)
        t = {**t, "pinned": False, "workers": None, "runs": {"10": {"authsvc": t, "control": None}}}
    for multiple, run in t["runs"].items():
        a, ctl = run["authsvc"], run["control"]
        rss = f"; RSS {t['rss_before_mb']:.0f} -> {t['rss_after_mb']:.0f} MiB" if multiple == "10" else ""
        rows.append((
            f"{multiple}x capacity: every call answered within 100 ms"
            + ("" if multiple == "10" else " (not a target)"),
            a["over_100ms"] == 0 and a["errored"] == 0,
            f"offered {a['offered_rps']:.0f}/s (capacity {t['capacity_rps']:.0f}/s"
            f"{', 1 worker pinned' if t['pinned'] else ''}): {a['over_100ms']} of {a['done']} over 100 ms, p99 "
            f"{a['p99_ms']:.1f} ms, max {a['max_ms']:.0f} ms, {a['refused']} refused{rss}"
            + ("" if ctl is None else
               f". Control (Envoy answering itself, same core and load): {ctl['over_100ms']} of {ctl['done']} over "
               f"100 ms, p99 {ctl['p99_ms']:.1f} ms"
               + (" - the machine cannot carry this load at all" if ctl["over_100ms"] else ""))))
    return [
        *rows,
        ("Redis hung: rate-limited p99 within 5 ms of Redis up", rd["hung_p99_ms"] <= rd["up_p99_ms"] + 5,
         f"p99 {rd['hung_p99_ms']:.2f} ms hung vs {rd['up_p99_ms']:.2f} ms up"),
    ]


# -- markdown --------------------------------------------------------------


def markdown(r: Results, command: str) -> str:
    m = r["machine"]
    cfg = r["config"]
    lines = [
        "# authsvc benchmark results",
        "",
        f"Written by `{command}` on {m['date']} from the measurements in `results.json`; see `README.md` for the "
        "method. Every throughput and latency figure is the median of "
        f"{cfg['runs']} runs (all runs listed); the machine is shared, so runs of one scenario are interleaved "
        "with the others'.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
    ]
    lines += [f"| {k.replace('_', ' ')} | {escape(v)} |" for k, v in m.items()]
    lines += [
        f"| servers | {cfg['workers']} processes each (authsvc `--workers {cfg['workers']}`, the stand-ins alike) |",
        f"| bench wall time | {r.get('seconds', 0):.0f} s |",
        "",
        "## Targets (issue 4)",
        "",
        "| target | result | numbers |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {t} | {_verdict(ok)} | {nums} |" for t, ok, nums in targets(r)]
    tp = r.get("throughput")
    if tp:
        lines += [
            "",
            f"## Authorize throughput (h2load, {cfg['connections']} connections x {cfg['streams']} streams, "
            f"{cfg['duration']:g} s per run after {cfg['warmup']:g} s warm-up)",
            "",
            "`good req/s` counts only answers that were the verified allowed AuthorizeResponse (by bytes on the wire); "
            "`server CPU` is the serving processes' user+system CPU per request, `PostgreSQL CPU` that of the "
            "backends serving the bench database.",
            "",
            "| scenario | good req/s (median) | runs | good answers | server CPU us/req | PostgreSQL CPU us/req "
            "| connections per worker (a run) |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, label in (("baseline", "empty handler"), ("hit", "authsvc, cache hit"),
                            ("hit_metrics", "authsvc, cache hit, metrics on"),
                            ("miss", "authsvc, cache miss (cache off)")):
            s = tp.get(name)
            if not s:  # results recorded before the metrics scenario existed
                continue
            lines.append(
                f"| {label} | {median([x['good_rps'] for x in s]):.0f} | {_runs([x['good_rps'] for x in s])} | "
                f"{min(x['good_fraction'] for x in s):.2%} (worst run) | "
                f"{median([x['server_cpu_us'] for x in s]):.0f} | {median([x['db_cpu_us'] for x in s]):.0f} | "
                f"{s[-1]['split']} |"
            )
    serial = r.get("serial")
    if serial:
        lines += [
            "",
            f"## Serial latency (h2load -c1 -m1, {cfg['serial_duration']:g} s per run)",
            "",
            "| scenario | p50 ms (median) | p50 runs | p99 ms (median) |",
            "| --- | --- | --- | --- |",
        ]
        for name in ("baseline", "hit", "miss"):
            s = serial[name]
            lines.append(f"| {name} | {median([x['p50_ms'] for x in s]):.3f} | "
                         f"{_runs([x['p50_ms'] for x in s], '{:.3f}')} | {median([x['p99_ms'] for x in s]):.3f} |")
    uq = r.get("unique")
    if uq:
        lines += [
            "",
            "## Cache misses: one repeated key vs distinct keys from the 1M table (Python client, cache off)",
            "",
            "| keys | req/s (median) | runs | authsvc CPU us/req | PostgreSQL CPU us/req |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name in ("same_key", "distinct_keys"):
            s = uq[name]
            lines.append(f"| {name.replace('_', ' ')} | {median([x['rps'] for x in s]):.0f} | "
                         f"{_runs([x['rps'] for x in s])} | {median([x['server_cpu_us'] for x in s]):.0f} | "
                         f"{median([x['db_cpu_us'] for x in s]):.0f} |")
    env = r.get("envoy")
    if env:
        lines += [
            "",
            f"## Through Envoy (wrk -c{cfg['wrk_connections']}, Envoy --concurrency {cfg['envoy_concurrency']}, "
            "direct_response route)",
            "",
            "| ext_authz server | req/s (median) | runs | non-2xx | p50 ms | Check server CPU us/req | "
            "Envoy CPU us/req |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, label in (("ok_check", "always-OK Check"), ("authsvc", "authsvc Check")):
            s = env[name]
            lines.append(f"| {label} | {median([x['rps'] for x in s]):.0f} | {_runs([x['rps'] for x in s])} | "
                         f"{sum(x['non_2xx'] for x in s)} | {median([x['p50_ms'] for x in s]):.2f} | "
                         f"{median([x['server_cpu_us'] for x in s]):.0f} | "
                         f"{median([x['envoy_cpu_us'] for x in s]):.0f} |")
    eh = r.get("envoy_http")
    if eh:
        lines += [
            "",
            f"## Through Envoy, HTTP mode vs gRPC mode (wrk -c{cfg['wrk_connections']}, Envoy --concurrency "
            f"{cfg['envoy_concurrency']}, direct_response route; serial: wrk -c1)",
            "",
            "| ext_authz server | req/s (median) | runs | non-2xx | serial p50 ms | check server CPU us/req | "
            "Envoy CPU us/req | connections per worker |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, label in (("authsvc_http", "authsvc, HTTP mode"), ("ok_http", "always-OK HTTP stand-in"),
                            ("ok_check", "always-OK gRPC Check stand-in")):
            s = eh[name]
            split = " / ".join(" ".join(str(v) for v in sorted(x["connections"].values())) for x in s
                               if "connections" in x) or "per-worker endpoints"
            lines.append(f"| {label} | {median([x['rps'] for x in s]):.0f} | {_runs([x['rps'] for x in s])} | "
                         f"{sum(x['non_2xx'] + x['serial_non_2xx'] for x in s)} | "
                         f"{median([x['serial_p50_ms'] for x in s]):.3f} | "
                         f"{median([x['server_cpu_us'] for x in s]):.0f} | "
                         f"{median([x['envoy_cpu_us'] for x in s]):.0f} | {split} |")
    rev = r.get("revocation")
    if rev:
        lat = [s["latency_ms"] for s in rev["samples"] if s["latency_ms"] is not None]
        loss = rev["losses"]
        lines += [
            "",
            f"## Revocation propagation ({rev['replicas']} replicas, {len(rev['samples'])} revocation x replica pairs)",
            "",
            "| p50 ms | p90 ms | p99 ms | max ms | allows after 50 ms | allows after a denial |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {percentile(lat, 0.5):.2f} | {percentile(lat, 0.9):.2f} | {percentile(lat, 0.99):.2f} | "
            f"{max(lat, default=float('nan')):.2f} | {sum(s['late_allows'] for s in rev['samples'])} | "
            f"{sum(s['allows_after_denial'] for s in rev['samples'])} |",
            "",
            f"Listener loss: {len(loss)} rounds; {rev['terminated_backends']} PostgreSQL backends of replica B "
            "terminated (LISTEN connection and pool), key revoked on A at once, B polled for 2 s: "
            f"{sum(s['late_allows'] + s['allows_after_denial'] for s in loss)} allows, "
            f"{sum(s['unavailable'] for s in loss)} UNAVAILABLE answers, first denial p50 "
            f"{percentile([s['latency_ms'] for s in loss if s['latency_ms'] is not None], 0.5):.2f} ms.",
        ]
    rl = r.get("ratelimit")
    if rl and rl["shared"]:
        lines += [
            "",
            f"## Rate-limit accuracy (limit {rl['shared'][0]['limit']} per {rl['shared'][0]['window_s']} s window, "
            "5x the limit offered, 2 replicas)",
            "",
            "| counters | windows | admitted / limit per window | worst | windows with a 429 below 0.9 x limit | "
            "answers straddling a window edge (left out) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        runs = [("Redis (shared)", rl["shared"])] + ([("local (no Redis)", [rl["local"]])] if rl.get("local") else [])
        for label, group in runs:
            windows = [w for run in group for w in run["windows"]]
            lines.append(f"| {label} | {len(windows)} | {_runs([w['ratio'] for w in windows], '{:.2f}')} | "
                         f"{max(w['ratio'] for w in windows):.3f} | {sum(1 for w in windows if w['early_429'])} | "
                         f"{sum(run['ambiguous'] for run in group)} |")
    mem = r.get("memory")
    if mem:
        p, i = mem["process"], mem["inprocess"]
        lines += [
            "",
            "## Memory per cached key",
            "",
            "| measurement | keys | RSS before MiB | RSS after MiB | bytes per key |",
            "| --- | --- | --- | --- | --- |",
            f"| in one process: authsvc's DecisionCache of KeyGrant.of(real rows) | {i['entries']:,} | "
            f"{i['rss_before'] / 2**20:.1f} | {i['rss_after'] / 2**20:.1f} | {i['bytes_per_key']:.0f} |",
            f"| real `authsvc serve` filled through Authorize | {p['keys']:,} | {p['rss_before'] / 2**20:.1f} | "
            f"{p['rss_after'] / 2**20:.1f} | {p['bytes_per_key']:.0f} |",
            "",
            f"The real process's keys were cached: re-authorizing {p['recheck_keys']:,} of them cost its PostgreSQL "
            f"backends {p['recheck_db_cpu_us']:.0f} us CPU per call against {p['fill_db_cpu_us']:.0f} us for their "
            "first lookups (what remains is the batched last_used_time write).",
        ]
    lines += ["", "![throughput, Envoy and revocation charts](results.svg)", ""]
    return "\n".join(lines)


# -- svg -------------------------------------------------------------------


def _bars(x0: float, y0: float, w: float, h: float, title: str, bars: list[tuple[str, list[float], str]]) -> list[str]:
    top = max((max(v) for _, v, _ in bars if v), default=1.0) * 1.15
    out = [f'<text x="{x0 + w / 2}" y="{y0 - 10}" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
           f'<line x1="{x0}" y1="{y0 + h}" x2="{x0 + w}" y2="{y0 + h}" stroke="#333"/>']
    slot = w / max(1, len(bars))
    for k, (label, values, color) in enumerate(bars):
        if not values:
            continue
        med = median(values)
        bh = h * med / top
        bx = x0 + k * slot + slot * 0.2
        out.append(f'<rect x="{bx:.1f}" y="{y0 + h - bh:.1f}" width="{slot * 0.6:.1f}" height="{bh:.1f}" '
                   f'fill="{color}"/>')
        for v in values:
            out.append(f'<circle cx="{bx + slot * 0.3:.1f}" cy="{y0 + h - h * v / top:.1f}" r="2.5" fill="#222"/>')
        out.append(f'<text x="{bx + slot * 0.3:.1f}" y="{y0 + h - bh - 6:.1f}" text-anchor="middle">{med:.0f}</text>')
        out.append(f'<text x="{bx + slot * 0.3:.1f}" y="{y0 + h + 16}" text-anchor="middle">{escape(label)}</text>')
    return out


def _cdf(x0: float, y0: float, w: float, h: float, title: str, values: list[float]) -> list[str]:
    out = [f'<text x="{x0 + w / 2}" y="{y0 - 10}" text-anchor="middle" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#333"/>']
    if not values:
        return out
    ordered = sorted(values)
    xmax = max(ordered[-1], 1.0) * 1.05
    pts = " ".join(f"{x0 + w * v / xmax:.1f},{y0 + h - h * (i + 1) / len(ordered):.1f}" for i, v in enumerate(ordered))
    out.append(f'<polyline points="{pts}" fill="none" stroke="#c0392b" stroke-width="2"/>')
    for frac in (0.0, 0.5, 1.0):
        out.append(f'<text x="{x0 - 4}" y="{y0 + h - h * frac + 4:.1f}" text-anchor="end">{frac:.0%}</text>')
    for tick in (0.0, xmax / 2, xmax):
        out.append(f'<text x="{x0 + w * tick / xmax:.1f}" y="{y0 + h + 16}" text-anchor="middle">{tick:.1f} ms</text>')
    p99 = percentile(ordered, 0.99)
    out.append(f'<text x="{x0 + w - 6}" y="{y0 + h - 8}" text-anchor="end">p50 {percentile(ordered, 0.5):.2f} ms, '
               f'p99 {p99:.2f} ms</text>')
    return out


def svg(r: Results) -> str:
    parts: list[str] = []
    tp = r.get("throughput")
    if tp:
        parts += _bars(60, 40, 360, 220, "Authorize, good req/s (h2load)", [
            ("empty handler", [s["good_rps"] for s in tp["baseline"]], "#7f8c8d"),
            ("cache hit", [s["good_rps"] for s in tp["hit"]], "#27ae60"),
            ("cache miss", [s["good_rps"] for s in tp["miss"]], "#e67e22"),
        ])
    env = r.get("envoy")
    if env:
        parts += _bars(480, 40, 240, 220, "Through Envoy, req/s (wrk)", [
            ("always-OK Check", [s["rps"] for s in env["ok_check"]], "#7f8c8d"),
            ("authsvc Check", [s["rps"] for s in env["authsvc"]], "#2980b9"),
        ])
    eh = r.get("envoy_http")
    if eh:
        parts += _bars(60, 320, 420, 220, "Through Envoy, HTTP vs gRPC mode, req/s (wrk)", [
            ("authsvc HTTP", [s["rps"] for s in eh["authsvc_http"]], "#2980b9"),
            ("always-OK HTTP", [s["rps"] for s in eh["ok_http"]], "#7f8c8d"),
            ("always-OK gRPC Check", [s["rps"] for s in eh["ok_check"]], "#95a5a6"),
        ])
    rev = r.get("revocation")
    if rev:
        parts += _cdf(820, 40, 300, 220, "Revocation: RevokeKey return -> denial elsewhere (CDF)",
                      [s["latency_ms"] for s in rev["samples"] if s["latency_ms"] is not None])
    body = "\n".join(parts)
    height = 600 if eh else 300
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="1180" height="{height}" font-family="sans-serif" '
            f'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')
