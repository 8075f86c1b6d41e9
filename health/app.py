"""The health page, its JSON API and Prometheus metrics (FastAPI; a Jinja2 template, no JS build)."""

from __future__ import annotations

import jinja2
from fastapi import FastAPI, HTTPException
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from health.monitor import Monitor
from health.schema import PeerView, Snapshot

PAGE = jinja2.Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="{{ refresh }}">
<title>swarmllm health</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1rem; color: #222; }
 .bar { display: flex; flex-wrap: wrap; gap: 2px; margin: .5rem 0; }
 .cell { width: 18px; height: 24px; border-radius: 3px; font-size: 10px; color: #fff; text-align: center; line-height: 24px; }
 .c0 { background: #d33; } .c1 { background: #e9a100; } .c2 { background: #2a2; }
 table { border-collapse: collapse; width: 100%; font-size: 14px; }
 th, td { border-bottom: 1px solid #ddd; padding: 4px 6px; text-align: left; }
 .wrap { overflow-x: auto; } .gap { color: #d33; font-weight: bold; } .ok { color: #2a2; }
</style></head><body>
<h1>swarmllm swarm health</h1>
<p>Snapshot of {{ when }} (refreshes every {{ refresh }} s). Audits published: {{ snap.audits_passed }} passed,
 {{ snap.audits_failed }} failed. <a href="/api/v1/state">JSON</a> · <a href="/docs">API docs</a> · <a href="/metrics">metrics</a></p>
{% if not snap.models %}<p>No peer has announced itself yet.</p>{% endif %}
{% for m in snap.models %}
<section class="model" data-model="{{ m.model_id }}">
<h2>{{ m.model_id }}</h2>
<p class="family">Family: <b>{{ m.model_type or 'not announced' }}</b></p>
<div class="bar">{% for c in m.coverage %}<div class="cell c{{ [c.online, 2]|min }}" data-block="{{ c.block }}" data-online="{{ c.online }}"
 title="block {{ c.block }}: {{ c.online }} online peer(s){% if c.peers %}: {{ c.peers|join(', ') }}{% endif %}">{{ c.block }}</div>{% endfor %}</div>
{% if m.gaps %}<p class="gap">Not served: {% for a, b in m.gaps %}{% if b - a == 1 %}block {{ a }}{% else %}blocks {{ a }}–{{ b - 1 }}{% endif %}{% if not loop.last %}, {% endif %}{% endfor %}. Generation through this swarm is impossible until someone serves them.</p>
{% else %}<p class="ok">Every block is served (weakest block: {{ m.min_coverage }} peer(s)).</p>{% endif %}
<div class="wrap"><table><thead><tr><th>name</th><th>peer</th><th>blocks</th><th>state</th><th>format</th><th>parameters</th><th>steps/s</th>
<th>RTT</th><th>reachable</th><th>free cache</th><th>sessions</th><th>version</th><th>uptime</th>
{% if m.peers|selectattr('audits_passed', 'ne', None)|list %}<th>audits ok/failed</th><th>last verdict</th>{% endif %}</tr></thead><tbody>
{% for p in m.peers %}<tr class="peer" data-peer="{{ p.peer_id }}">
<td>{{ p.public_name }}</td><td title="{{ p.peer_id }}">{{ p.short_id }}</td><td>{{ p.start }}–{{ p.end - 1 }}</td><td>{{ p.state }}</td>
<td>{{ p.format }}</td><td>{{ '{:,}'.format(p.num_parameters) if p.num_parameters else '—' }}</td><td>{{ '%.1f' % p.throughput }}</td><td>{{ '%.1f ms' % p.rtt_ms if p.rtt_ms is not none else '—' }}</td>
<td>{{ ('yes' + (' (relay)' if p.relayed else '')) if p.reachable else 'no' }}</td><td>{{ p.cache_tokens_left }}</td><td>{{ p.num_sessions }}</td>
<td>{{ p.version }}</td><td>{{ '%.0f s' % p.uptime_s if p.uptime_s is not none else '—' }}</td>
{% if m.peers|selectattr('audits_passed', 'ne', None)|list %}<td>{{ p.audits_passed if p.audits_passed is not none else '—' }}/{{ p.audits_failed if p.audits_failed is not none else '—' }}</td><td>{{ p.last_verdict or '—' }}</td>{% endif %}
</tr>{% endfor %}</tbody></table></div>
{% set proven = m.proofs|selectattr('status', 'eq', 'signed')|list %}
{% if proven %}<h3 class="liars">Proven liars</h3>
<p>Each of these peers signed outputs that other peers do not compute; the proof (its inputs, its signed outputs)
is served by the client that caught it, and every client re-runs it before banning the peer.</p>
<div class="wrap"><table><thead><tr><th>peer</th><th>blocks</th><th>proof by</th><th>published</th></tr></thead><tbody>
{% for p in proven %}<tr class="liar" data-peer="{{ p.accused }}"><td title="{{ p.accused }}">{{ p.short_id }}</td><td>{{ p.start }}–{{ p.end - 1 }}</td>
<td title="{{ p.author }}">…{{ p.author[-8:] }}</td><td>{{ p.time|int }}</td></tr>{% endfor %}</tbody></table></div>{% endif %}
</section>{% endfor %}
</body></html>""")


def make_app(monitor: Monitor) -> FastAPI:
    app = FastAPI(title="swarmllm health", version="1")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        import datetime
        snap = monitor.latest
        when = datetime.datetime.fromtimestamp(snap.generated_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return PAGE.render(snap=snap, when=when, refresh=max(1, int(monitor.period)))

    @app.get("/api/v1/state", response_model=Snapshot)
    async def state(refresh: bool = False) -> Snapshot:
        """The latest snapshot; ``?refresh=true`` asks for a fresh one (rate-limited)."""
        return await monitor.refresh(on_demand=True) if refresh else monitor.latest

    @app.get("/api/v1/peers/{peer_id}", response_model=PeerView)
    async def peer(peer_id: str) -> PeerView:
        for m in monitor.latest.models:
            for p in m.peers:
                if p.peer_id == peer_id:
                    return p
        raise HTTPException(status_code=404, detail=f"no announced peer {peer_id!r} in the latest snapshot")

    class SwarmCollector:
        """The latest snapshot as Prometheus metrics (prometheus_client's exposition)."""

        def collect(self):
            snap = monitor.latest
            online = GaugeMetricFamily("swarmllm_peers_online", "Reachable online peers, by model.", labels=["model"])
            covered = GaugeMetricFamily("swarmllm_blocks_covered", "Blocks served by an online peer, by model.",
                                        labels=["model"])
            least = GaugeMetricFamily("swarmllm_min_coverage", "Online peers of the least served block, by model.",
                                      labels=["model"])
            for m in snap.models:
                online.add_metric([m.model_id], sum(p.state == "online" and p.reachable for p in m.peers))
                covered.add_metric([m.model_id], sum(c.online > 0 for c in m.coverage))
                least.add_metric([m.model_id], m.min_coverage)
            audits = CounterMetricFamily("swarmllm_audits", "Published audit verdicts, by result.", labels=["result"])
            audits.add_metric(["passed"], snap.audits_passed)
            audits.add_metric(["failed"], snap.audits_failed)
            yield from (online, covered, least, audits)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SwarmCollector())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
