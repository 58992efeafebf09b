// Hierarchical stein_2019 model (Stein et al. 2019 closed form) for the Stan side of
// benchmarks/stan_comparison.py. Written to match carkin's population model term by term:
//
//   typical values   fold, tmax, cmax, alpha, beta ~ LogNormal(mu_log[k], prior_sd)
//                    logit_fb ~ Normal(mu_logit_fb, prior_sd)   (fb = inv_logit(logit_fb))
//   between-subject  omega[k] ~ HalfNormal(omega_scale[k]), order fold tmax cmax alpha fb beta
//   non-centred      z[s, k] ~ Normal(0, 1)
//   individual       theta_sk = theta_k exp(omega_k z_sk); fb_s = inv_logit(logit_fb + omega_5 z_s5)
//   residual error   log y ~ Normal(log f, sigma) with the -log y Jacobian (density of y);
//                    BLQ records censored (M3): log Phi((log LLOQ - log f) / sigma)
//   sigma ~ HalfNormal(sigma_scale)
//
// Every term is added with target += *_lpdf so that normalising constants are kept
// (half-normals include their log 2): the log density equals carkin's, not just up to
// a constant. Syntax is kept to what Stan 2.21 (rstan 2.21) accepts.
data {
  int<lower=1> S;                       // subjects
  int<lower=1> N;                       // observation records
  int<lower=1, upper=S> subject[N];
  vector[N] t;                          // time after the first infusion (day)
  int<lower=0> N_obs;                   // quantified records
  int<lower=1, upper=N> idx_obs[N_obs];
  vector[N_obs] log_y;                  // log of the quantified values (natural units)
  int<lower=0> N_cens;                  // BLQ records
  int<lower=1, upper=N> idx_cens[N_cens];
  vector[N_cens] log_lloq;
  vector[5] mu_log;                     // prior log-medians of fold, tmax, cmax, alpha, beta
  real mu_logit_fb;                     // prior logit-median of fb
  real<lower=0> prior_sd;
  vector<lower=0>[6] omega_scale;       // HalfNormal scales of the omegas
  real<lower=0> sigma_scale;
  real<lower=0> prediction_floor;       // predictions are floored here before the log
}
parameters {
  real<lower=0> fold;
  real<lower=0> tmax;
  real<lower=0> cmax;
  real<lower=0> alpha;
  real logit_fb;
  real<lower=0> beta;
  vector<lower=0>[6] omega;
  real<lower=0> sigma;
  matrix[S, 6] z;
}
model {
  vector[S] fold_i = fold * exp(omega[1] * col(z, 1));
  vector[S] tmax_i = tmax * exp(omega[2] * col(z, 2));
  vector[S] cmax_i = cmax * exp(omega[3] * col(z, 3));
  vector[S] alpha_i = alpha * exp(omega[4] * col(z, 4));
  vector[S] fb_i = inv_logit(logit_fb + omega[5] * col(z, 5));
  vector[S] beta_i = beta * exp(omega[6] * col(z, 6));
  vector[N] log_f;

  for (n in 1:N) {
    int s = subject[n];
    real f;
    if (t[n] < tmax_i[s]) {
      f = cmax_i[s] / fold_i[s] * exp(log(fold_i[s]) / tmax_i[s] * t[n]);
    } else {
      real after = t[n] - tmax_i[s];
      f = cmax_i[s] * ((1 - fb_i[s]) * exp(-alpha_i[s] * after) + fb_i[s] * exp(-beta_i[s] * after));
    }
    log_f[n] = log(fmax(f, prediction_floor));
  }

  // priors
  target += lognormal_lpdf(fold | mu_log[1], prior_sd);
  target += lognormal_lpdf(tmax | mu_log[2], prior_sd);
  target += lognormal_lpdf(cmax | mu_log[3], prior_sd);
  target += lognormal_lpdf(alpha | mu_log[4], prior_sd);
  target += lognormal_lpdf(beta | mu_log[5], prior_sd);
  target += normal_lpdf(logit_fb | mu_logit_fb, prior_sd);
  target += normal_lpdf(omega | 0, omega_scale) + 6 * log2();
  target += normal_lpdf(sigma | 0, sigma_scale) + log2();
  target += normal_lpdf(to_vector(z) | 0, 1);

  // likelihood
  target += normal_lpdf(log_y | log_f[idx_obs], sigma) - sum(log_y);
  target += normal_lcdf(log_lloq | log_f[idx_cens], sigma);
}
generated quantities {
  real fb = inv_logit(logit_fb);
}
