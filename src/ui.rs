//! `/ui` on the admin listener: one self-contained page (no build step, no external assets, works
//! offline) that shows, per route, the cutover readiness by hour as a plot, the top open misses and each
//! backend's state, refreshing itself from `/ui/data.json` every few seconds.

use serde::Serialize;

use crate::app::App;
use crate::ledger::report::RouteReport;

/// The window the page shows.
const WINDOW_SECS: u64 = 7 * 24 * 3600;

#[derive(Serialize)]
struct Data {
    generated_at: u64,
    ledger: Option<String>,
    routes: Vec<RouteView>,
}

#[derive(Serialize)]
struct RouteView {
    name: String,
    target: String,
    backends: Vec<BackendView>,
    report: Option<RouteReport>,
}

#[derive(Serialize)]
struct BackendView {
    name: String,
    up: bool,
}

/// The JSON behind the page.
pub async fn data(app: &App) -> Result<String, String> {
    let snap = app.snapshot();
    let now = crate::ledger::now_unix();
    let ledger = app.recorder.ledger.as_ref();
    let mut routes = Vec::new();
    for r in snap.router.routes() {
        let report = match ledger {
            Some(l) => Some(
                l.route_report(&r.name, &r.target, now.saturating_sub(WINDOW_SECS), 20)
                    .await
                    .map_err(|e| format!("ledger: {e}"))?,
            ),
            None => None,
        };
        let backends = r
            .backends
            .iter()
            .map(|b| BackendView { name: b.clone(), up: snap.backends.get(b).is_some_and(|x| !x.health.is_down()) })
            .collect();
        routes.push(RouteView { name: r.name.clone(), target: r.target.clone(), backends, report });
    }
    let ledger = ledger.map(|l| l.describe());
    serde_json::to_string(&Data { generated_at: now, ledger, routes }).map_err(|e| e.to_string())
}

pub const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>regmux cutover</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.1em;margin:0 0 .4em}
section.route{background:#fff;border:1px solid #ddd;border-radius:6px;padding:1em;margin:1em 0}
.share{font-size:2em;font-weight:600} .muted{color:#777}
table{border-collapse:collapse;width:100%;margin-top:.5em} td,th{border-bottom:1px solid #eee;padding:.25em .5em;text-align:left;font-size:13px}
td.num,th.num{text-align:right} code{font-size:12px}
.up{color:#1a7f37} .down{color:#cf222e;font-weight:600} svg{background:#f6f8fa;border-radius:4px}
</style></head><body>
<h1>regmux cutover readiness</h1>
<div class="muted" id="status">loading…</div>
<div id="routes"></div>
<script>
"use strict";
function esc(s){return String(s==null?"":s).replace(/[&<>"']/g,c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));}
function bytes(b){const u=["B","KiB","MiB","GiB","TiB"];let i=0;while(b>=1024&&i<u.length-1){b/=1024;i++;}return (i?b.toFixed(1):b)+" "+u[i];}
function plot(hours){
  const w=600,h=120,p=24;
  if(!hours.length){return '<div class="muted">no traffic in the window</div>';}
  const t0=hours[0].hour,t1=Math.max(hours[hours.length-1].hour,t0+3600);
  const x=t=>p+(w-2*p)*(t-t0)/(t1-t0), y=s=>h-p+(-(h-2*p))*s/100;
  const pts=hours.map(o=>x(o.hour).toFixed(1)+","+y(o.target_request_share).toFixed(1)).join(" ");
  const dots=hours.map(o=>'<circle cx="'+x(o.hour).toFixed(1)+'" cy="'+y(o.target_request_share).toFixed(1)+'" r="2.5" fill="#0969da"><title>'+esc(new Date(o.hour*1000).toISOString().slice(0,13))+'h: '+o.target_request_share+'% of '+o.requests+'</title></circle>').join("");
  return '<svg class="plot" width="'+w+'" height="'+h+'" role="img" aria-label="target share by hour">'+
    '<line x1="'+p+'" y1="'+y(100)+'" x2="'+(w-p)+'" y2="'+y(100)+'" stroke="#ccc" stroke-dasharray="3"/>'+
    '<text x="2" y="'+(y(100)+4)+'" font-size="10">100%</text><text x="8" y="'+(y(0)+4)+'" font-size="10">0%</text>'+
    '<line x1="'+p+'" y1="'+y(0)+'" x2="'+(w-p)+'" y2="'+y(0)+'" stroke="#ccc"/>'+
    '<polyline fill="none" stroke="#0969da" stroke-width="2" points="'+pts+'"/>'+dots+'</svg>';
}
function render(d){
  document.getElementById("status").textContent=(d.ledger?"ledger "+d.ledger:"no ledger configured")+" · updated "+new Date(d.generated_at*1000).toLocaleTimeString();
  document.getElementById("routes").innerHTML=d.routes.map(r=>{
    const rep=r.report;
    const backends=r.backends.map(b=>'<span class="'+(b.up?"up":"down")+'" data-backend="'+esc(b.name)+'">'+esc(b.name)+(b.name===r.target?" (target)":"")+": "+(b.up?"up":"down")+'</span>').join(" · ");
    let body='<div class="muted">no ledger</div>';
    if(rep){
      const misses=rep.misses.map(m=>'<tr class="miss"><td class="num">'+m.count+'</td><td>'+esc(m.outcome)+'</td><td>'+esc(m.kind)+'</td><td><code>'+esc(m.repository)+(m.reference.indexOf(":")>=0?"@":":")+esc(m.reference)+'</code>'+(m.digest&&m.digest!==m.reference?'<br><code class="muted">'+esc(m.digest)+'</code>':'')+'</td><td>'+esc(m.served_by||"-")+'</td><td>'+esc(new Date(m.last_seen*1000).toISOString().replace("T"," ").slice(0,19))+'</td></tr>').join("");
      body='<div><span class="share" data-share="'+rep.target_request_share+'">'+rep.target_request_share.toFixed(1)+'%</span> of requests and '+rep.target_byte_share.toFixed(1)+'% of bytes served by the target ('+rep.target_requests+' of '+rep.requests+' requests, '+bytes(rep.target_bytes)+' of '+bytes(rep.bytes)+'), last 7 days</div>'+
        plot(rep.hours)+
        '<h3 style="font-size:1em;margin:.8em 0 0">Open misses: <span class="open-misses">'+rep.open_misses+'</span></h3>'+
        (misses?'<table><thead><tr><th class="num">count</th><th>outcome</th><th>kind</th><th>object</th><th>served by</th><th>last seen (UTC)</th></tr></thead><tbody>'+misses+'</tbody></table>':'<div class="muted">none: the target serves everything asked for</div>');
    }
    return '<section class="route" data-route="'+esc(r.name)+'"><h2>'+esc(r.name)+'</h2><div>'+backends+'</div>'+body+'</section>';
  }).join("");
}
async function refresh(){
  try{const r=await fetch("/ui/data.json",{cache:"no-store"});if(!r.ok)throw new Error(r.status+" "+await r.text());render(await r.json());}
  catch(e){document.getElementById("status").textContent="cannot load data: "+e.message;}
}
refresh();setInterval(refresh,5000);
</script></body></html>
"##;
