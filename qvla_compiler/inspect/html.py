"""`qvla inspect --html`: one self-contained page (inline CSS, JS and SVG; no network) drawn from inspect_data.

The page embeds the data as JSON and draws, in the browser: the linear graph (one column per layer cluster, nodes
filled by role and outlined by bits, dashed = float), per-layer SQNR bars, α per head / β per block when the program
has ATM/OHB, the memory table per region, and the per-linear table. When drawing finishes, `#qvla-status` carries
`data-quantized` (integer nodes drawn) and `data-errors` (script errors caught), which the browser test reads.
"""
from __future__ import annotations

import html
import json

from qvla_compiler.inspect.summary import _BITS_COLOURS, _ROLE_COLOURS

_CSS = """
body{font:13px/1.4 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 4px} h2{font-size:15px;margin:18px 0 6px}
.scroll{overflow:auto;border:1px solid #ddd;max-height:640px} table{border-collapse:collapse}
td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left} td.n{text-align:right}
.legend span{display:inline-block;margin-right:10px} .sw{width:12px;height:12px;display:inline-block;
vertical-align:middle;margin-right:3px;border:2px solid #fff} #qvla-status{color:#888;margin-top:12px}
svg text{font-size:10px} .node rect{rx:4} .node:hover rect{stroke-width:4}
"""

_JS = r"""
(function(){
var errors=[];window.addEventListener('error',function(e){errors.push(String(e.message))});
var D=JSON.parse(document.getElementById('qvla-data').textContent);
var ROLE=JSON.parse(document.getElementById('qvla-role').textContent);
var BITS=JSON.parse(document.getElementById('qvla-bits').textContent);
var NS='http://www.w3.org/2000/svg';
function el(tag,attrs,parent,text){var e=document.createElementNS(NS,tag);for(var k in attrs)e.setAttribute(k,attrs[k]);
 if(text!==undefined)e.textContent=text;if(parent)parent.appendChild(e);return e}
function h(tag,text,parent,cls){var e=document.createElement(tag);if(text!==undefined)e.textContent=text;
 if(cls)e.className=cls;if(parent)parent.appendChild(e);return e}
function kib(b){return (b/1024).toFixed(1)}
try{
 // graph: one column per cluster, in order of first appearance
 var clusters=[],byC={};D.graph.nodes.forEach(function(n){if(!byC[n.cluster]){byC[n.cluster]=[];clusters.push(n.cluster)}
  byC[n.cluster].push(n)});
 var CW=170,NH=30,TOP=34,pos={},rows=0;clusters.forEach(function(c){rows=Math.max(rows,byC[c].length)});
 var svg=el('svg',{width:clusters.length*CW+20,height:TOP+rows*NH+20,id:'qvla-graph'},document.getElementById('graph'));
 var gE=el('g',{},svg),gN=el('g',{},svg);
 clusters.forEach(function(c,i){var x=10+i*CW;el('rect',{x:x,y:4,width:CW-12,height:TOP+byC[c].length*NH,
  fill:'#f7f7f7',stroke:'#ddd',rx:6},gN);el('text',{x:x+6,y:18,'font-weight':'bold'},gN,c.length>26?'…'+c.slice(-25):c);
  byC[c].forEach(function(n,j){var y=TOP+j*NH;pos[n.id]=[x,y];var q=n.bits!=='float';
   var g=el('g',{'class':'node'+(q?' q':' f'),'data-path':n.module_path},gN);
   el('title',{},g,n.graph+': '+n.module_path+' · '+n.role+' · '+n.region+' · '+n.bits+
     (n.sqnr_db!==null?' · '+n.sqnr_db+' dB':''));
   el('rect',{x:x+4,y:y,width:CW-20,height:NH-6,fill:ROLE[n.role]||'#fff',stroke:BITS[n.bits]||'#000',
     'stroke-width':q?3:1,'stroke-dasharray':q?'':'4 2'},g);
   var leaf=n.module_path.split('.').pop();el('text',{x:x+9,y:y+15},g,(leaf.length>16?leaf.slice(0,15)+'…':leaf)+' '+n.bits)})});
 D.graph.edges.forEach(function(e){var a=pos[e.source],b=pos[e.target];if(!a||!b)return;
  var x1=a[0]+CW-16,y1=a[1]+12,x2=b[0]+4,y2=b[1]+12,mx=(x1+x2)/2;
  el('path',{d:'M'+x1+','+y1+' C'+mx+','+y1+' '+mx+','+y2+' '+x2+','+y2,fill:'none',stroke:'#999',
   'stroke-opacity':0.45},gE)});
 var lg=document.getElementById('legend');
 Object.keys(ROLE).forEach(function(r){var s=h('span','',lg);var w=h('span','',s,'sw');w.style.background=ROLE[r];
  s.appendChild(document.createTextNode(r))});
 Object.keys(BITS).forEach(function(b){var s=h('span','',lg);var w=h('span','',s,'sw');w.style.borderColor=BITS[b];
  s.appendChild(document.createTextNode(b))});
 // per-layer SQNR bars (integer linears: mean, and the worst one)
 var per=[];clusters.forEach(function(c){var v=byC[c].filter(function(n){return n.sqnr_db!==null&&n.sqnr_db!=='inf'})
  .map(function(n){return +n.sqnr_db});if(v.length)per.push([c,v.reduce(function(a,b){return a+b},0)/v.length,
  Math.min.apply(null,v),v.length])});
 var maxS=Math.max.apply(null,per.map(function(p){return p[1]}).concat([1]));
 var bs=el('svg',{width:980,height:per.length*20+10,id:'qvla-sqnr'},document.getElementById('sqnr'));
 per.forEach(function(p,i){var y=5+i*20;el('text',{x:0,y:y+12},bs,p[0].length>34?'…'+p[0].slice(-33):p[0]);
  el('rect',{x:230,y:y,width:Math.max(1,420*p[1]/maxS),height:14,fill:'#1f5fbf','class':'bar'},bs);
  el('text',{x:236+420*p[1]/maxS,y:y+12},bs,p[1].toFixed(1)+' dB (min '+p[2].toFixed(1)+', '+p[3]+' linears)')});
 if(!per.length)h('p','no integer linears',document.getElementById('sqnr'));
 // α per head, β per block (ATM / OHB), when present
 var at=document.getElementById('attn'),A=D.attention&&D.attention.graphs;
 if(!A||!Object.keys(A).length){h('p','no ATM/OHB scales in this program',at)}else{
  var t=h('table','',at),hr=h('tr','',t);['graph','block','q proj','α per head','β'].forEach(function(x){h('th',x,hr)});
  Object.keys(A).forEach(function(g){A[g].forEach(function(s){var tr=h('tr','',t);h('td',g,tr);h('td',String(s.block),tr);
   h('td',(s.q_proj||[]).join(', '),tr);var td=h('td','',tr),al=s.alpha||[];
   var sv=el('svg',{width:Math.max(20,al.length*12),height:34},td);al.forEach(function(a,k){var hh=Math.min(30,15*a);
    el('rect',{x:k*12,y:32-hh,width:10,height:hh,fill:'#4e79a7'},sv,undefined);el('title',{},sv.lastChild,'head '+k+': α '+a)});
   h('td',s.beta===undefined?'':(+s.beta).toFixed(3),tr,'n')})})}
 // memory per region
 var mt=h('table','',document.getElementById('memory')),mh=h('tr','',mt);
 ['region','integer','float','KiB bf16','KiB now'].forEach(function(x){h('th',x,mh)});var reg={};
 D.linears.forEach(function(r){var m=reg[r.region]=reg[r.region]||[0,0,0,0];m[r.bits==='float'?1:0]++;
  m[2]+=r.bytes_bf16;m[3]+=r.bytes_quant});
 var tot=[0,0,0,0];Object.keys(reg).forEach(function(k){var m=reg[k],tr=h('tr','',mt);h('td',k,tr);
  m.forEach(function(v,i){tot[i]+=v;h('td',i<2?String(v):kib(v),tr,'n')})});
 var tr=h('tr','',mt);h('th','linears',tr);tot.forEach(function(v,i){h('th',i<2?String(v):kib(v),tr)});
 var S=D.summary;h('p','whole policy: '+kib(S.policy_bytes_bf16)+' KiB bf16 → '+kib(S.policy_bytes_quant)+' KiB ('+
  (100*S.policy_memory_saving).toFixed(1)+'% saved); action SQNR vs float '+S.action_sqnr_db+' dB',
  document.getElementById('memory'));
 // every linear
 var lt=h('table','',document.getElementById('linears')),lh=h('tr','',lt);
 ['graph','module path','region','role','bits','rotation','α/β','KiB bf16','KiB now','SQNR dB'].forEach(function(x){h('th',x,lh)});
 D.linears.forEach(function(r){var tr=h('tr','',lt);[r.graph,r.module_path,r.region,r.role,r.bits,r.rotation||'',
  r.scale||''].forEach(function(x){h('td',x,tr)});h('td',kib(r.bytes_bf16),tr,'n');h('td',kib(r.bytes_quant),tr,'n');
  h('td',r.sqnr_db===null?'':String(r.sqnr_db),tr,'n')});
}catch(e){errors.push(String(e&&e.stack||e))}
var st=document.getElementById('qvla-status');
st.setAttribute('data-quantized',String(document.querySelectorAll('#qvla-graph .node.q').length));
st.setAttribute('data-nodes',String(document.querySelectorAll('#qvla-graph .node').length));
st.setAttribute('data-errors',String(errors.length));
st.textContent=errors.length?'errors: '+errors.join(' | '):'rendered '+st.getAttribute('data-nodes')+' linears, '+
 st.getAttribute('data-quantized')+' integer';
})();
"""


def render_html(data: dict) -> str:
    """The inspect page for one program's data (from inspect_data)."""
    from qvla_compiler.inspect.summary import fmt_scale

    data = {**data, "linears": [{**r, "scale": fmt_scale(r.get("alpha"), r.get("beta"))} for r in data["linears"]]}
    s = data["summary"]
    title = html.escape(f"{data['program']}: {s['model']} · {s['recipe']} · layout {s['layout']}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_CSS}</style></head><body>
<h1>{title}</h1>
<div>{s['int_linears']} integer linears, {s['float_linears']} float · quantized components
{s['bytes_bf16'] / 1024:.1f} KiB bf16 → {s['bytes_quant'] / 1024:.1f} KiB · action rel L2 {s['action_rel_l2']}</div>
<h2>Graph (one column per layer; fill = role, outline = bits, dashed = float)</h2>
<div id="legend" class="legend"></div><div id="graph" class="scroll"></div>
<h2>Output SQNR vs float, per layer</h2><div id="sqnr"></div>
<h2>ATM α per head / OHB β per block</h2><div id="attn"></div>
<h2>Memory</h2><div id="memory"></div>
<h2>Linears</h2><div id="linears" class="scroll"></div>
<div id="qvla-status" data-quantized="-1" data-errors="-1">script did not run</div>
<script type="application/json" id="qvla-data">{_json(data)}</script>
<script type="application/json" id="qvla-role">{_json(_ROLE_COLOURS)}</script>
<script type="application/json" id="qvla-bits">{_json(_BITS_COLOURS)}</script>
<script>{_JS}</script>
</body></html>
"""


def _json(value) -> str:
    # "</" would end the <script> element early; "<\/" is the same JSON string.
    return json.dumps(value, default=str).replace("</", "<\\/")
