"""Record-level distributed DP on breast cancer, simulated: the central DP-SGD step that the
sites' masked sum computes under `privacy.mode = "distributed"` (Poisson rate q, per-row clip C,
sum over the expected batch B = q*N, continuous Gaussian noise z*C, plain SGD), with an RDP
accountant of the subsampled Gaussian, 10 % of epsilon left to the round metrics as the job's
calibration does. It chose the e2e test's q, rounds and learning rate (BENCHMARKS.md,
"Distributed DP"). The split mimics the e2e's: every fifth row held out, 80 % of the rest trains.

    .venv/bin/python scripts/distributed_dp_sim.py [SEEDS]
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
print("training rows", N)
seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 20
for target in [1.0, 3.0]:
    for q, T, lr in [(0.5, 10, 2.0), (0.5, 20, 2.0), (1.0, 10, 2.0)]:
        res = [run(q, T, lr, target, seed=s) for s in range(seeds)]
        accs = np.array([r[1] for r in res]); lls = np.array([r[2] for r in res])
        print(f"eps={target} q={q} rounds={T} lr={lr} z={res[0][0]:.2f}: accuracy {accs.mean():.3f} +- {accs.std():.3f} (min {accs.min():.3f}), log-loss {lls.mean():.3f} +- {lls.std():.3f} over {seeds} seeds")
