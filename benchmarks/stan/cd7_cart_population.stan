// Hierarchical cd7_cart model (mechanistic ODE, naturally selected product) for the Stan side of
// benchmarks/stan_ode_comparison.py. Written to match carkin's population model term by term:
//
//   typical values   rho, d_e, k_kill ~ LogNormal(mu_log[k], prior_sd)
//                    logit_f_blood ~ Normal(mu_logit_f_blood, prior_sd)   (f_blood = inv_logit)
//   between-subject  omega[k] ~ HalfNormal(omega_scale[k]), order rho d_e k_kill f_blood
//   random effects   per column k of the sampled matrix z (data flag centred[k], as carkin's centred=):
//                    non-centred  z[s, k] ~ Normal(0, 1), unconstrained individual value h_sk = mu_k + omega_k z_sk
//                    centred      z[s, k] = h_sk ~ Normal(mu_k, omega_k)
//                    mu = (log rho, log d_e, log k_kill, logit_f_blood)
//   individual       theta_sk = exp(h_sk) for rho, d_e, k_kill; f_blood_s = inv_logit(h_s4)
//   residual error   per observable (1 car_copies, 2 cd7_cells): log y ~ Normal(log f, sigma[kind]) with
//                    the -log y Jacobian; BLQ records censored (M3): log Phi((log LLOQ - log f) / sigma),
//                    log Phi computed as carkin computes it (erfc, asymptotic series below u = -30)
//   sigma[k] ~ HalfNormal(sigma_scale[k])
//
// Predictions: the ODE is integrated piecewise between dose times (integrate_ode_rk45); a dose adds
// cells * f_blood_s / blood volume to E; an observation at a dose time takes the post-dose state;
// times before the first dose take the initial state. The segments (which times each solve reports,
// which dose starts it) depend on the data only and are built by the Python script from carkin's design.
//
// Every term is added with target += *_lpdf so that normalising constants are kept: the log density
// equals carkin's, not just up to a constant. Syntax is kept to what Stan 2.21 (rstan 2.21) accepts.
functions {
  // d/dt of (E, M, X, B, R, N); theta = (rho, d_e, k_kill), x_r = fixed values and CD7N0 (see transformed data)
  real[] cd7_rhs(real t, real[] y, real[] theta, real[] x_r, int[] x_i) {
    real dydt[6];
    real eff = y[1];
    real mem = y[2];
    real exh = y[3];
    real b = y[4];
    real r = y[5];
    real n = y[6];
    real car = eff + mem + exh;
    real antigen = b + n + x_r[12] * car;
    real stim = antigen / (x_r[1] + antigen);
    real window = x_r[3] + (1 - x_r[3]) * exp(-x_r[2] * t);
    real density = 1 / (1 + car / x_r[4]);
    real growth = theta[1] * window * stim * density;
    real loss = theta[2] + x_r[5] + x_r[7] * stim + x_r[11] * x_r[12] * car;
    real kill = theta[3] * eff / (x_r[10] + b + n);
    real tumour_growth = x_r[13] * (1 - (b + r) / x_r[14]);
    dydt[1] = (growth - loss) * eff + x_r[6] * stim * mem;
    dydt[2] = x_r[5] * eff - (x_r[6] * stim + x_r[8]) * mem;
    dydt[3] = x_r[7] * stim * eff - x_r[9] * exh;
    dydt[4] = (tumour_growth - kill) * b;
    dydt[5] = tumour_growth * r;
    dydt[6] = (x_r[16] * x_r[17] + x_r[15] * n) * (1 - n / x_r[17]) - kill * n;
    return dydt;
  }

  // log Phi(u) as carkin.observation.log_normal_cdf computes it
  real log_Phi(real u) {
    real out;
    if (u > -30) {
      if (u > 0) {
        out = log1m(0.5 * erfc(u / sqrt2()));
      } else {
        out = log(0.5 * erfc(-u / sqrt2()));
      }
    } else {
      real w = 1 / (u * u);
      out = -0.5 * u * u - log(-u) - 0.5 * log(2 * pi()) + log1p(w * (-1 + w * (3 + w * (-15 + 105 * w))));
    }
    return out;
  }
}
data {
  int<lower=1> S;                       // subjects
  // fixed parameter values (the model's)
  real<lower=0> k_a;
  real<lower=0> k_ld;
  real<lower=0, upper=1> g_inf;
  real<lower=0> k_c;
  real<lower=0> k_em;
  real<lower=0> a_m;
  real<lower=0> k_ex;
  real<lower=0> d_m;
  real<lower=0> d_x;
  real<lower=0> km_kill;
  real<lower=0> k_fr;
  real<lower=0> phi;                    // fratricide scale of the product type
  real<lower=0> r_t;
  real<lower=0> k_t;
  real<lower=0, upper=1> f_r;
  real<lower=0> f_pb;
  real<lower=0> r_n;
  real<lower=0> s_n;
  real<lower=0> wbc;
  real<lower=0> vcn;
  real<lower=0> cells_per_ug;           // diploid cells per µg gDNA (qPCR conversion)
  // covariates
  vector<lower=0>[S] blast;             // marrow blast %
  vector<lower=0>[S] cd7n0;             // normal CD7+ cells/µL at infusion
  vector<lower=0>[S] blood_volume;      // µL (carkin.physiology.blood_volume_ul of WT)
  // states at the unique observation times of each subject (grid points, flat over subjects)
  int<lower=1> NG;
  int<lower=0> N_pre;                   // grid points before the first dose: initial state
  int<lower=1, upper=NG> pre_grid[N_pre];
  int<lower=1, upper=S> pre_subject[N_pre];
  // solve segments, in order, each starting at an event time of its subject
  int<lower=1> G;
  int<lower=1, upper=S> seg_subject[G];
  int<lower=0, upper=1> seg_first[G];   // first segment of its subject: starts from the initial state
  real seg_t0[G];
  real<lower=0> seg_cells[G];           // cells infused at seg_t0 (added to E before the segment)
  int<lower=0> seg_n_at[G];             // grid points at seg_t0 (post-dose state)
  int<lower=1, upper=NG> seg_at_start[G];
  int<lower=0> seg_n_ts[G];             // solver output times (grid points, then the next event time if any)
  int<lower=1> seg_ts_start[G];
  int<lower=0> seg_n_out[G];            // of which grid points
  int<lower=1, upper=NG> seg_out_start[G];
  int<lower=1> NTS;
  real ts_all[NTS];
  // observations
  int<lower=1> N;
  int<lower=1, upper=NG> obs_grid[N];
  int<lower=1, upper=2> obs_kind[N];    // 1 car_copies, 2 cd7_cells
  int<lower=0> N_obs;
  int<lower=1, upper=N> idx_obs[N_obs];
  vector[N_obs] log_y;                  // log of the quantified values (natural units)
  int<lower=0> N_cens;
  int<lower=1, upper=N> idx_cens[N_cens];
  vector[N_cens] log_lloq;
  // priors
  vector[3] mu_log;                     // prior log-medians of rho, d_e, k_kill
  real mu_logit_f_blood;
  real<lower=0> prior_sd;
  vector<lower=0>[4] omega_scale;
  vector<lower=0>[2] sigma_scale;
  real<lower=0> prediction_floor;       // predictions are floored here before the log
  // solver
  real<lower=0> rtol;
  real<lower=0> atol;
  int<lower=1> max_num_steps;
  // parameterisation of each random effect (order rho, d_e, k_kill, f_blood): 1 centred, 0 non-centred
  int<lower=0, upper=1> centred[4];
}
transformed data {
  real x_r[S, 17];
  real y0[S, 6];
  int x_i[0];
  int kind_obs[N_obs] = obs_kind[idx_obs];
  int kind_cens[N_cens] = obs_kind[idx_cens];
  real sum_log_y = sum(log_y);
  for (s in 1:S) {
    real tumour = blast[s] / 100 * k_t;
    x_r[s] = {k_a, k_ld, g_inf, k_c, k_em, a_m, k_ex, d_m, d_x, km_kill, k_fr, phi, r_t, k_t, r_n, s_n, cd7n0[s]};
    y0[s] = {0.0, 0.0, 0.0, tumour * (1 - f_r), tumour * f_r, cd7n0[s]};
  }
}
parameters {
  real<lower=0> rho;
  real<lower=0> d_e;
  real<lower=0> k_kill;
  real logit_f_blood;
  vector<lower=0>[4] omega;
  vector<lower=0>[2] sigma;
  matrix[S, 4] z;
}
model {
  vector[4] mu;
  matrix[S, 4] h;                       // unconstrained individual values
  vector[S] rho_i;
  vector[S] d_e_i;
  vector[S] k_kill_i;
  vector[S] f_blood_i;
  real state[NG, 6];
  vector[N] log_f;

  mu[1] = log(rho);
  mu[2] = log(d_e);
  mu[3] = log(k_kill);
  mu[4] = logit_f_blood;
  for (k in 1:4) {
    if (centred[k] == 1)
      h[:, k] = col(z, k);
    else
      h[:, k] = mu[k] + omega[k] * col(z, k);
  }
  rho_i = exp(col(h, 1));
  d_e_i = exp(col(h, 2));
  k_kill_i = exp(col(h, 3));
  f_blood_i = inv_logit(col(h, 4));

  for (i in 1:N_pre)
    state[pre_grid[i]] = y0[pre_subject[i]];
  {
    real y[6];
    for (g in 1:G) {
      int s = seg_subject[g];
      if (seg_first[g] == 1)
        y = y0[s];
      y[1] = y[1] + seg_cells[g] * (f_blood_i[s] / blood_volume[s]);
      for (i in 1:seg_n_at[g])
        state[seg_at_start[g] + i - 1] = y;
      if (seg_n_ts[g] > 0) {
        real sol[seg_n_ts[g], 6] = integrate_ode_rk45(
          cd7_rhs, y, seg_t0[g], ts_all[seg_ts_start[g]:(seg_ts_start[g] + seg_n_ts[g] - 1)],
          {rho_i[s], d_e_i[s], k_kill_i[s]}, x_r[s], x_i, rtol, atol, max_num_steps);
        for (i in 1:seg_n_out[g])
          state[seg_out_start[g] + i - 1] = sol[i];
        y = sol[seg_n_ts[g]];
      }
    }
  }

  for (n in 1:N) {
    real car = state[obs_grid[n], 1] + state[obs_grid[n], 2] + state[obs_grid[n], 3];
    real f;
    if (obs_kind[n] == 1) {
      f = car / (wbc + car) * vcn * cells_per_ug;
    } else {
      f = state[obs_grid[n], 6] + f_pb * state[obs_grid[n], 4] + phi * car;
    }
    log_f[n] = log(fmax(f, prediction_floor));
  }

  // priors, in carkin's site order
  target += lognormal_lpdf(rho | mu_log[1], prior_sd);
  target += lognormal_lpdf(d_e | mu_log[2], prior_sd);
  target += lognormal_lpdf(k_kill | mu_log[3], prior_sd);
  target += normal_lpdf(logit_f_blood | mu_logit_f_blood, prior_sd);
  target += normal_lpdf(omega | 0, omega_scale) + 4 * log2();
  target += normal_lpdf(sigma | 0, sigma_scale) + 2 * log2();
  for (k in 1:4) {
    if (centred[k] == 1)
      target += normal_lpdf(col(z, k) | mu[k], omega[k]);
    else
      target += normal_lpdf(col(z, k) | 0, 1);
  }

  // likelihood
  target += normal_lpdf(log_y | log_f[idx_obs], sigma[kind_obs]) - sum_log_y;
  for (i in 1:N_cens)
    target += log_Phi((log_lloq[i] - log_f[idx_cens[i]]) / sigma[kind_cens[i]]);
}
generated quantities {
  real f_blood = inv_logit(logit_f_blood);
}
