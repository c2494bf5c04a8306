"""Record-level distributed DP on breast cancer, simulated: the central DP-SGD step that the
sites' masked sum computes under `privacy.mode = "distributed"` (Poisson rate q, per-row clip C,
sum over the expected batch B = q*N, continuous Gaussian noise z*C, plain SGD), with an RDP
accountant of the subsampled Gaussian, 10 % of epsilon left to the round metrics as the job's
calibration does. It chose the e2e test's q, rounds and learning rate (BENCHMARKS.md,
"Distributed DP"). The split mimics the e2e's: every fifth row held out, 80 % of the rest trains.

    .venv/bin/python scripts/distributed_dp_sim.py [SEEDS]

`--small-sites M [SEEDS]`: where the theory says distributed DP should win (issue 18): the
training rows split at random over M sites of ~N/M rows each, and at the same (epsilon, delta)
local DP-SGD (every site runs DP-SGD on its own rows with the full noise, FedAvg of the sites'
models each round, its own RDP accountant at the site's sampling rate) against the distributed
step above. Each method gets a small grid of rounds / learning rates, reported whole (the
best cell is picked on the held-out rows for both alike, so both are equally optimistic).

    .venv/bin/python scripts/distributed_dp_sim.py --small-sites 20 [SEEDS]
"""
import numpy as np, math, sys, os
from math import comb, log, exp
rows=[l.strip().split(',') for l in open(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'data', 'breast_cancer_wisconsin.csv'))][1:]
X=np.array([[float(v) for v in r[:30]] for r in rows]); y=np.array([1 if r[30]=='malignant' else 0 for r in rows])
X=(X-X.mean(0))/X.std(0)
idx=np.arange(len(rows)); test=idx%5==4; tr=~test
Xtr,ytr,Xte,yte=X[tr],y[tr],X[test],y[test]
# 80% train per site roughly
n=len(ytr); keep=np.random.RandomState(0).rand(n)<0.8
Xtr,ytr=Xtr[keep],ytr[keep]; N=len(ytr)
def rdp_sgm(q,z,alpha):
    if q==1: return alpha/(2*z*z)
    s=[ ]
    for k in range(alpha+1):
        s.append(log(comb(alpha,k))+k*log(q)+(alpha-k)*log(1-q)+(k*k-k)/(2*z*z))
    m=max(s); return (m+log(sum(exp(v-m) for v in s)))/(alpha-1)
def eps(q,z,T,delta=1e-5):
    best=1e9
    for a in list(range(2,64))+[80,96,128,256]:
        r=T*rdp_sgm(q,z,a)
        e=r+log((a-1)/a)-(log(delta)+log(a))/(a-1)
        best=min(best,e)
    return best
def calib(q,T,target):
    lo,hi=0.3,200
    for _ in range(50):
        mid=(lo+hi)/2
        if eps(q,mid,T)>target: lo=mid
        else: hi=mid
    return hi
def run(q,T,lr,target,C=1.0,seed=0):
    z=calib(q,T,target*0.9)  # leave ~10% for metrics
    rng=np.random.RandomState(seed); B=q*N
    W=np.zeros((30,2)); b=np.zeros(2)
    for t in range(T):
        m=rng.rand(N)<q; xs,ys=Xtr[m],ytr[m]
        lo=xs@W+b; p=np.exp(lo-lo.max(1,keepdims=True)); p/=p.sum(1,keepdims=True)
        p[np.arange(len(ys)),ys]-=1
        gW=np.einsum('ni,nj->nij',xs,p); gb=p
        norms=np.sqrt((gW**2).sum((1,2))+(gb**2).sum(1)); c=np.minimum(1,C/np.maximum(norms,1e-12))
        SW=(gW*c[:,None,None]).sum(0)+rng.randn(30,2)*z*C; Sb=(gb*c[:,None]).sum(0)+rng.randn(2)*z*C
        W-=lr*SW/B; b-=lr*Sb/B
    lo=Xte@W+b; pred=lo.argmax(1); acc=(pred==yte).mean()
    lp=lo-lo.max(1,keepdims=True); lp-=np.log(np.exp(lp).sum(1,keepdims=True)); ll=-lp[np.arange(len(yte)),yte].mean()
    return z,acc,ll
def evaluate(W, b):
    lo=Xte@W+b; pred=lo.argmax(1); acc=(pred==yte).mean()
    lp=lo-lo.max(1,keepdims=True); lp-=np.log(np.exp(lp).sum(1,keepdims=True)); ll=-lp[np.arange(len(yte)),yte].mean()
    return acc, ll
def clipped_grads(W, b, xs, ys, C):
    lo=xs@W+b; p=np.exp(lo-lo.max(1,keepdims=True)); p/=p.sum(1,keepdims=True)
    p[np.arange(len(ys)),ys]-=1
    gW=np.einsum('ni,nj->nij',xs,p); gb=p
    norms=np.sqrt((gW**2).sum((1,2))+(gb**2).sum(1)); c=np.minimum(1,C/np.maximum(norms,1e-12))
    return (gW*c[:,None,None]).sum(0), (gb*c[:,None]).sum(0)
def run_local(sites, R, E, Bs, lr, target, C=1.0, seed=0):
    """Local DP-SGD at every site (Poisson batches of expected size Bs from the site's rows,
    E epochs per round, noise z*C on each clipped batch sum), FedAvg of the sites' models
    weighted by rows, R rounds; z calibrated per site for its own q and steps."""
    rng=np.random.RandomState(seed); W=np.zeros((30,2)); b=np.zeros(2)
    zs={}
    for (xs_site, ys_site) in sites:
        n=len(ys_site); q=min(1.0, Bs/n); T=R*max(1, round(E/q))
        if (q,T) not in zs: zs[(q,T)]=calib(q,T,target*0.9)
    total=sum(len(y) for _,y in sites)
    for r in range(R):
        newW=np.zeros_like(W); newb=np.zeros_like(b)
        for (xs_site, ys_site) in sites:
            n=len(ys_site); q=min(1.0, Bs/n); steps=max(1, round(E/q)); z=zs[(q,R*steps)]
            w=W.copy(); bb=b.copy(); B=q*n
            for _ in range(steps):
                m=rng.rand(n)<q
                gW,gb=clipped_grads(w,bb,xs_site[m],ys_site[m],C)
                w-=lr*(gW+rng.randn(30,2)*z*C)/B; bb-=lr*(gb+rng.randn(2)*z*C)/B
            newW+=w*n/total; newb+=bb*n/total
        W,b=newW,newb
    return evaluate(W,b)
def small_sites(m, seeds):
    # Every training row (no 80 % cut), split at random over m sites (a fixed split per seed).
    Xall,yall=X[tr],y[tr]; n=len(yall)
    print(f"{n} training rows over {m} sites (~{n/m:.0f} rows each), {len(yte)} held out; {seeds} seeds")
    global Xtr,ytr,N
    Xtr,ytr,N=Xall,yall,n
    for target in [0.5, 1.0, 3.0]:
        print(f"\neps={target} delta=1e-5")
        for R,E,Bs,lr in [(5,1,8,0.5),(10,1,8,0.5),(5,2,8,0.5),(10,1,8,0.2),(5,1,4,0.5)]:
            res=[]
            for s in range(seeds):
                perm=np.random.RandomState(1000+s).permutation(n)
                sites=[(Xall[part],yall[part]) for part in np.array_split(perm,m)]
                res.append(run_local(sites,R,E,Bs,lr,target,seed=s))
            a=np.array([r[0] for r in res]); l=np.array([r[1] for r in res])
            print(f"  local DP-SGD     rounds={R} epochs={E} batch={Bs} lr={lr}: accuracy {a.mean():.3f} +- {a.std():.3f} (min {a.min():.3f}), log-loss {l.mean():.3f} +- {l.std():.3f}")
        for q,T,lr in [(0.5,10,2.0),(0.5,20,2.0),(1.0,10,2.0),(0.25,20,1.0)]:
            res=[run(q,T,lr,target,seed=s) for s in range(seeds)]
            a=np.array([r[1] for r in res]); l=np.array([r[2] for r in res])
            print(f"  distributed      q={q} rounds={T} lr={lr} z={res[0][0]:.2f}: accuracy {a.mean():.3f} +- {a.std():.3f} (min {a.min():.3f}), log-loss {l.mean():.3f} +- {l.std():.3f}")
if len(sys.argv) > 1 and sys.argv[1] == "--small-sites":
    small_sites(int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 10)
    sys.exit(0)
print("training rows", N)
seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
for target in [1.0, 3.0]:
    for q, T, lr in [(0.5, 10, 2.0), (0.5, 20, 2.0), (1.0, 10, 2.0)]:
        res = [run(q, T, lr, target, seed=s) for s in range(seeds)]
        accs = np.array([r[1] for r in res]); lls = np.array([r[2] for r in res])
        print(f"eps={target} q={q} rounds={T} lr={lr} z={res[0][0]:.2f}: accuracy {accs.mean():.3f} +- {accs.std():.3f} (min {accs.min():.3f}), log-loss {lls.mean():.3f} +- {lls.std():.3f} over {seeds} seeds")
