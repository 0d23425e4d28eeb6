"""Diffusion math in sigma space: noise schedules and the sigmas a sampler walks (schedule), the eps / x0 / v / score
parameterizations, the discrete forward process, posterior and variational bound (process) and training losses
(losses), learned variances (variances), a cascade stage's conditioning augmentation (conditioning_augmentation), network -> denoiser D(x, sigma) wrappers and guidance (denoiser), samplers over one signature (samplers,
sampling, samplers_multistep, samplers_dpmpp), sigma schedules and fitting one to a model (sigma_schedules,
schedule_search), score SDEs and their reverse family (sde), likelihoods (likelihood), and Gaussian-mixture data with
an analytic denoiser (toy)."""

from ldm.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "schedule": (
        "BetaSchedule", "Spacing", "Flavor", "FinalSigma", "Interpolation", "Quantize", "ZERO_SNR_ALPHA_BAR", "KARRAS_RHO",
        "betas_linear", "betas_scaled_linear", "betas_cosine", "rescale_zero_terminal_snr",
        "alphas_cumprod_from_betas", "sigmas_from_alphas_cumprod", "alphas_cumprod_from_sigmas", "NoiseSchedule",
        "default_spacing", "sd_schedule", "betas_from_alphas_cumprod", "shift_snr", "inference_timesteps",
        "ddim_step_targets", "t_to_sigma", "sigma_to_t", "karras_sigmas", "sampler_sigmas"
    ),
    "parameterization": (
        "Prediction", "PREDICTIONS", "x0_from_eps", "eps_from_x0", "v_from_x0_eps", "x0_from_v", "eps_from_v",
        "score_from_eps", "eps_from_score", "to_x0", "to_eps", "target"
    ),
    "process": (
        "gather", "snr", "q_mean_variance", "q_sample", "posterior_variances", "q_posterior", "PMeanVariance",
        "p_mean_variance", "normal_kl", "continuous_gaussian_log_likelihood", "discretized_gaussian_log_likelihood",
        "VLB", "vlb_terms"
    ),
    "losses": (
        "min_snr_weight", "diffusion_loss", "timestep_bias_weights", "HYBRID_LAMBDA", "vlb_term", "hybrid_loss"
    ),
    "variances": (
        "VarianceType", "LEARNED_VARIANCES", "DIFFUSERS_VARIANCE_TYPES", "is_learned", "check_variance_type",
        "check_variance_channels", "split_variance", "learned_range_log_variance", "model_log_variance",
        "VarianceHead", "step_log_variance", "LossSecondMomentSampler"
    ),
    "conditioning_augmentation": (
        "gaussian_kernel1d", "kernel_size_for", "gaussian_blur", "random_blur_sigmas", "random_noise_levels",
        "augment", "random_augment"
    ),
    "sampling": (
        "Denoiser", "Callback", "check_sigmas", "denoise", "to_d", "ancestral_step"
    ),
    "denoiser": (
        "vp_input_scale", "eps_from_denoised", "DiscreteVPDenoiser", "ContinuousVPDenoiser", "VEDenoiser",
        "rescale_guidance", "check_interval", "CFGDenoiser", "ClassifierGuidedDenoiser",
        "call_with_variance"
    ),
    "samplers": (
        "sample_euler", "sample_euler_ancestral", "sample_ddim", "sample_ddpm", "sample_heun",
        "sample_dpmpp_2m", "SamplingPlan", "Sampler", "SAMPLERS", "sample"
    ),
    "samplers_multistep": (
        "unipc_coefficients", "sample_unipc", "lms_coefficients", "sample_lms"
    ),
    "samplers_dpmpp": (
        "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_2s_ancestral"
    ),
    "sigma_schedules": (
        "SigmaSchedule", "SIGMA_SCHEDULES", "AYS_SIGMAS", "check_sigma_schedule", "resolve_sigma_schedule",
        "exponential_sigmas", "loglinear_interp", "ays_sigmas", "table_schedule", "schedule_sigmas", "sigma_lookup"
    ),
    "schedule_search": (
        "with_zero", "optimize_sigmas"
    ),
    "sde": (
        "isotropic_normal_log_prob", "VPSDE", "VESDE", "reverse_sde_step", "sample_reverse_sde",
        "langevin_step_size", "sample_pc", "sample_langevin"
    ),
    "likelihood": (
        "LogLikelihood", "bits_per_dim", "divergence_exact", "divergence_hutchinson", "pf_ode_log_likelihood",
        "vp_eps_model", "elbo_log_likelihood"
    ),
    "toy": (
        "GaussianMixture", "mixture_1d", "mixture_2d"
    ),
})
